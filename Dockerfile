FROM python:3.11-slim AS build
WORKDIR /app
COPY pyproject.toml requirements.lock ./
COPY src ./src
COPY workers ./workers
RUN python -m venv /venv \
 && /venv/bin/pip install --no-cache-dir --upgrade pip \
 && /venv/bin/pip install --no-cache-dir --constraint requirements.lock .

FROM python:3.11-slim
RUN useradd --system --uid 10001 mediavault \
 && mkdir -p /data/blobs && chown mediavault /data/blobs
COPY --from=build /venv /venv
ENV PATH=/venv/bin:$PATH \
    MEDIAVAULT_GRPC_ADDR=0.0.0.0:50051 \
    MEDIAVAULT_HTTP_ADDR=0.0.0.0:8081 \
    MEDIAVAULT_METRICS_ADDR=0.0.0.0:9464 \
    MEDIAVAULT_BLOB_DIR=/data/blobs
USER mediavault
EXPOSE 50051 8081 9464
STOPSIGNAL SIGTERM
ENTRYPOINT ["mediavault"]
CMD ["serve"]
