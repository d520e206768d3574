# One image for every process: `serve` (default), `worker` or `migrate`.
FROM python:3.11-slim-bookworm AS build
WORKDIR /app
COPY scripts ./scripts
RUN scripts/install-system-deps.sh
COPY pyproject.toml setup.py requirements.lock ./
COPY src ./src
COPY workers ./workers
# pillow-simd is compiled here, with AVX2 when the build machine has it: run the image on
# CPUs of the same generation (an AVX2 build stops with SIGILL on an older CPU).
RUN python -m venv /venv \
 && /venv/bin/pip install --no-cache-dir --upgrade pip \
 && scripts/install-imaging.sh /venv requirements.lock \
 && /venv/bin/pip install --no-cache-dir --constraint requirements.lock .

FROM python:3.11-slim-bookworm
# ffmpeg (with ffprobe) makes the video renditions: the worker runs it as a subprocess, exec'd through
# util-linux's setpriv (dies with the worker) and prlimit (memory cap), Essential in Debian and so here.
RUN apt-get update \
 && apt-get install -y --no-install-recommends libjpeg62-turbo libturbojpeg0 libwebp7 libwebpmux3 libwebpdemux2 liblcms2-2 ffmpeg \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 mediavault \
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
