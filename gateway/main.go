// Command mediavault-gateway serves StorageService and MediaService as REST/JSON, following the
// google.api.http annotations of protos/, by proxying every call to the gRPC server.
//
// Environment: MEDIAVAULT_GRPC_ADDR, the server (default 127.0.0.1:50051), and
// MEDIAVAULT_GATEWAY_ADDR, where to listen (default 127.0.0.1:8080).
package main

import (
	"context"
	"errors"
	"log"
	"net/http"
	"os"
	"sort"
	"strconv"
	"strings"

	"github.com/golang/protobuf/proto"
	"github.com/grpc-ecosystem/grpc-gateway/runtime"
	_ "google.golang.org/genproto/googleapis/rpc/errdetails" // ErrorInfo & co., so error details marshal to JSON
	"google.golang.org/grpc"

	mediav1 "mediavault/gen/go/mediavault/media/v1"
	storagev1 "mediavault/gen/go/mediavault/storage/v1"
)

// responseHeaders is the response metadata that becomes HTTP headers. The server sends it as
// trailers, which grpc-gateway v1 forwards only as HTTP trailers (Grpc-Trailer-*) by itself.
var responseHeaders = map[string]bool{
	"ratelimit-limit": true, "ratelimit-remaining": true, "ratelimit-reset": true, "retry-after": true, "x-request-id": true,
}

func main() {
	upstream := env("MEDIAVAULT_GRPC_ADDR", "127.0.0.1:50051")
	listen := env("MEDIAVAULT_GATEWAY_ADDR", "127.0.0.1:8080")

	conn, err := grpc.Dial(upstream, grpc.WithInsecure())
	if err != nil {
		log.Fatalf("dial %s: %v", upstream, err)
	}

	runtime.HTTPError = func(ctx context.Context, mux *runtime.ServeMux, m runtime.Marshaler, w http.ResponseWriter, r *http.Request, err error) {
		copyTrailers(ctx, w)
		if err == errNotModified {
			// No body: drop what announced one (ForwardResponseMessage set them before the options ran).
			w.Header().Del("Content-Type")
			w.Header().Del("Trailer")
			w.WriteHeader(http.StatusNotModified)
			return
		}
		runtime.DefaultHTTPError(ctx, mux, m, w, r, err)
	}
	mux := runtime.NewServeMux(
		runtime.WithMarshalerOption(runtime.MIMEWildcard, &runtime.JSONPb{OrigName: true, EmitDefaults: true}),
		runtime.WithIncomingHeaderMatcher(incomingHeader),
		runtime.WithOutgoingHeaderMatcher(outgoingHeader),
		runtime.WithForwardResponseOption(forwardResponse),
	)
	ctx := context.Background()
	if err := storagev1.RegisterStorageServiceHandler(ctx, mux, conn); err != nil {
		log.Fatal(err)
	}
	if err := mediav1.RegisterMediaServiceHandler(ctx, mux, conn); err != nil {
		log.Fatal(err)
	}

	log.Printf("mediavault-gateway listening on %s, proxying to %s", listen, upstream)
	log.Fatal(http.ListenAndServe(listen, acceptedFormats(ifNoneMatch(mux))))
}

func env(name, fallback string) string {
	if v := os.Getenv(name); v != "" {
		return v
	}
	return fallback
}

// incomingHeader passes the caller's X-Request-Id and W3C trace context (traceparent,
// tracestate) on as gRPC metadata, so that the server's log lines and spans join the BFF's
// request, besides the gateway's defaults (Authorization, Grpc-Metadata-* and the permanent
// HTTP headers).
func incomingHeader(key string) (string, bool) {
	switch key {
	case "X-Request-Id", "Traceparent", "Tracestate":
		return strings.ToLower(key), true
	}
	return runtime.DefaultHeaderMatcher(key)
}

// outgoingHeader forwards header metadata of responseHeaders unprefixed, and no other.
func outgoingHeader(key string) (string, bool) {
	return key, responseHeaders[key]
}

// errNotModified is what forwardResponse answers for a feed page the client holds already:
// grpc-gateway v1 then hands it to runtime.HTTPError instead of writing the body, and main's
// HTTPError writes a bodiless 304.
var errNotModified = errors.New("not modified")

// forwardResponse runs before a successful response is written: the rate-limit and request-id
// trailers become headers, and a feed page's etag becomes the ETag header; a page whose etag
// the client sent in If-None-Match (ifNoneMatch) is a 304 Not Modified.
func forwardResponse(ctx context.Context, w http.ResponseWriter, resp proto.Message) error {
	copyTrailers(ctx, w)
	if feed, ok := resp.(*mediav1.ListFeedResponse); ok {
		w.Header().Set("ETag", `"`+feed.Etag+`"`)
		if feed.NotModified {
			return errNotModified
		}
	}
	return nil
}

func copyTrailers(ctx context.Context, w http.ResponseWriter) {
	md, _ := runtime.ServerMetadataFromContext(ctx)
	for key, values := range md.TrailerMD {
		if !responseHeaders[key] {
			continue
		}
		for _, v := range values {
			w.Header().Add(key, v)
		}
	}
}

// ifNoneMatch copies If-None-Match on GET /v1/feed into the if_none_match query parameter:
// grpc-gateway v1 binds path, query and body to request fields, never a header.
func ifNoneMatch(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if etag := r.Header.Get("If-None-Match"); etag != "" && r.URL.Path == "/v1/feed" {
			query := r.URL.Query()
			query.Set("if_none_match", strings.Trim(etag, `"`))
			r.URL.RawQuery = query.Encode()
		}
		next.ServeHTTP(w, r)
	})
}

// acceptedFormats copies the image types of the Accept header, best first by their q values,
// into the accept query parameters of GET /v1/feed and GET /v1/media/{id}, unless the query
// names some itself, and marks those responses Vary: Accept, since the variants' formats follow
// it. The server ignores the types it does not make (application/json among them).
func acceptedFormats(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method == http.MethodGet && (r.URL.Path == "/v1/feed" || strings.HasPrefix(r.URL.Path, "/v1/media/")) {
			w.Header().Add("Vary", "Accept")
			query := r.URL.Query()
			if _, named := query["accept"]; !named {
				if types := byPreference(r.Header.Values("Accept")); len(types) > 0 {
					query["accept"] = types
					r.URL.RawQuery = query.Encode()
				}
			}
		}
		next.ServeHTTP(w, r)
	})
}

// byPreference is the media types of Accept header values in preference order: higher q first,
// the header's order among equals, q=0 (not acceptable) left out.
func byPreference(headers []string) []string {
	type ranked struct {
		mime string
		q    float64
	}
	var found []ranked
	for _, header := range headers {
		for _, entry := range strings.Split(header, ",") {
			parts := strings.Split(entry, ";")
			mime := strings.TrimSpace(parts[0])
			q := 1.0
			for _, param := range parts[1:] {
				if name, value, ok := strings.Cut(strings.TrimSpace(param), "="); ok && strings.EqualFold(name, "q") {
					if parsed, err := strconv.ParseFloat(value, 64); err == nil {
						q = parsed
					}
				}
			}
			if mime != "" && q > 0 {
				found = append(found, ranked{mime, q})
			}
		}
	}
	sort.SliceStable(found, func(i, j int) bool { return found[i].q > found[j].q })
	types := make([]string, len(found))
	for i, f := range found {
		types[i] = f.mime
	}
	return types
}
