// Command mediavault-gateway serves StorageService and MediaService as REST/JSON, following the
// google.api.http annotations of protos/, by proxying every call to the gRPC server.
//
// Environment: MEDIAVAULT_GRPC_ADDR, the server (default 127.0.0.1:50051), and
// MEDIAVAULT_GATEWAY_ADDR, where to listen (default 127.0.0.1:8080).
package main

import (
	"context"
	"log"
	"net/http"
	"os"
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
	log.Fatal(http.ListenAndServe(listen, ifNoneMatch(mux)))
}

func env(name, fallback string) string {
	if v := os.Getenv(name); v != "" {
		return v
	}
	return fallback
}

// incomingHeader passes the caller's X-Request-Id on as gRPC metadata, besides the gateway's
// defaults (Authorization, Grpc-Metadata-* and the permanent HTTP headers).
func incomingHeader(key string) (string, bool) {
	if key == "X-Request-Id" {
		return "x-request-id", true
	}
	return runtime.DefaultHeaderMatcher(key)
}

// outgoingHeader forwards header metadata of responseHeaders unprefixed, and no other.
func outgoingHeader(key string) (string, bool) {
	return key, responseHeaders[key]
}

// forwardResponse runs before a successful response is written: the rate-limit and request-id
// trailers become headers, and a feed page's etag becomes the ETag header.
func forwardResponse(ctx context.Context, w http.ResponseWriter, resp proto.Message) error {
	copyTrailers(ctx, w)
	if feed, ok := resp.(*mediav1.ListFeedResponse); ok {
		w.Header().Set("ETag", `"`+feed.Etag+`"`)
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
