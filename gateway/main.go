// Command mediavault-gateway serves StorageService and MediaService as REST/JSON, following the
// google.api.http annotations of protos/, by proxying every call to the gRPC server.
//
// Environment: MEDIAVAULT_GRPC_ADDR, the server (default 127.0.0.1:50051);
// MEDIAVAULT_GATEWAY_ADDR, where to listen (default 127.0.0.1:8080);
// MEDIAVAULT_GATEWAY_SHUTDOWN_GRACE_SECONDS, how long requests in flight at SIGTERM or SIGINT
// may still take (default 10); MEDIAVAULT_GATEWAY_READ_HEADER_TIMEOUT_SECONDS, how long a client
// may take to send a request's headers (default 10).
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log"
	"net/http"
	"net/url"
	"os"
	"os/signal"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"
	"unicode/utf8"

	"github.com/golang/protobuf/descriptor"
	"github.com/golang/protobuf/proto"
	descpb "github.com/golang/protobuf/protoc-gen-go/descriptor"
	"github.com/grpc-ecosystem/grpc-gateway/protoc-gen-grpc-gateway/httprule"
	"github.com/grpc-ecosystem/grpc-gateway/runtime"
	"google.golang.org/genproto/googleapis/api/annotations"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	mediav1 "mediavault/gen/go/mediavault/media/v1"
	storagev1 "mediavault/gen/go/mediavault/storage/v1"
)

const (
	// maxRequestBytes is the server's grpc.max_receive_message_length: a larger body would not
	// reach it, and grpc-gateway v1 reads a whole body into memory before decoding it.
	maxRequestBytes = 8 << 20
	// maxHeaderBytes bounds a request's headers, forwarded or not; net/http answers 431 past it
	// and 4 KiB more, request line included.
	maxHeaderBytes = 8 << 10
	// maxForwardedBytes bounds the headers that become gRPC metadata: the server refuses calls
	// whose metadata passes 8 KiB at random (gRPC's soft limit, RESOURCE_EXHAUSTED) and all past
	// 16 KiB, and gRPC adds its own (the method, content type, user agent).
	maxForwardedBytes = 4 << 10
)

// responseHeaders is the response metadata that becomes HTTP headers. The server sends it as
// trailers, which grpc-gateway v1 forwards only as HTTP trailers (Grpc-Trailer-*) by itself.
var responseHeaders = map[string]bool{
	"ratelimit-limit": true, "ratelimit-remaining": true, "ratelimit-reset": true, "retry-after": true, "x-request-id": true,
}

// incomingHeaders is what incomingHeader forwards besides what runtime.AnnotateContext always
// does; forwardedHeaders is both, the headers whose values must be valid gRPC metadata.
var (
	incomingHeaders  = []string{"X-Request-Id", "Traceparent", "Tracestate"}
	forwardedHeaders = append([]string{"Authorization", "X-Forwarded-For", "X-Forwarded-Host"}, incomingHeaders...)
)

func main() {
	upstream := env("MEDIAVAULT_GRPC_ADDR", "127.0.0.1:50051")
	listen := env("MEDIAVAULT_GATEWAY_ADDR", "127.0.0.1:8080")
	grace := seconds("MEDIAVAULT_GATEWAY_SHUTDOWN_GRACE_SECONDS", 10)
	readHeaderTimeout := seconds("MEDIAVAULT_GATEWAY_READ_HEADER_TIMEOUT_SECONDS", 10)

	conn, err := grpc.Dial(upstream, grpc.WithInsecure())
	if err != nil {
		log.Fatalf("dial %s: %v", upstream, err)
	}

	runtime.HTTPError = httpError
	mux := runtime.NewServeMux(
		runtime.WithMarshalerOption(runtime.MIMEWildcard, &runtime.JSONPb{OrigName: true, EmitDefaults: true}),
		runtime.WithIncomingHeaderMatcher(incomingHeader),
		runtime.WithOutgoingHeaderMatcher(outgoingHeader),
		runtime.WithForwardResponseOption(forwardResponse),
	)
	routes, err := annotatedRoutes(fileOf(&storagev1.BeginUploadRequest{}), fileOf(&mediav1.GetMediaRequest{}))
	if err != nil {
		log.Fatal(err)
	}
	ctx := context.Background()
	// Before the generated handlers: the mux takes the first route that matches.
	handleUploadContent(mux, routes.of(uploadContentRPC), storagev1.NewStorageServiceClient(conn))
	if err := storagev1.RegisterStorageServiceHandler(ctx, mux, conn); err != nil {
		log.Fatal(err)
	}
	if err := mediav1.RegisterMediaServiceHandler(ctx, mux, conn); err != nil {
		log.Fatal(err)
	}
	runtime.OtherErrorHandler = func(w http.ResponseWriter, r *http.Request, _ string, httpStatus int) {
		routingError(mux, routes, w, r, httpStatus)
	}

	// headAsGet first: the others read the method the mux will route.
	feed := routes.of(listFeedRPC)
	handler := headAsGet(routes, limitBody(mux, validMetadata(mux, decodableURL(mux,
		acceptedFormats(append(routes.of(getMediaRPC), feed...), ifNoneMatch(feed, routedAsSent(mux, routes)))))))
	server := &http.Server{
		Addr:              listen,
		Handler:           handler,
		ReadHeaderTimeout: readHeaderTimeout,
		IdleTimeout:       120 * time.Second,
		MaxHeaderBytes:    maxHeaderBytes,
	}
	// Never stopped: a second signal must not cut the requests the first one lets finish.
	stop, _ := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	served := make(chan error, 1)
	go func() { served <- server.ListenAndServe() }()
	log.Printf("mediavault-gateway listening on %s, proxying to %s", listen, upstream)
	select {
	case err := <-served:
		log.Fatal(err)
	case <-stop.Done():
	}
	log.Printf("shutting down: requests in flight have %s to finish", grace)
	deadline, cancel := context.WithTimeout(context.Background(), grace)
	err = server.Shutdown(deadline)
	cancel()
	if err != nil {
		log.Fatalf("shutdown: %v; the requests still in flight are cut", err)
	}
}

// fileOf is the descriptor of the proto file that declares message, and the services whose
// handlers were generated beside it.
func fileOf(message descriptor.Message) *descpb.FileDescriptorProto {
	file, _ := descriptor.ForMessage(message)
	return file
}

func env(name, fallback string) string {
	if v := os.Getenv(name); v != "" {
		return v
	}
	return fallback
}

func seconds(name string, fallback float64) time.Duration {
	value := fallback
	if v := os.Getenv(name); v != "" {
		parsed, err := strconv.ParseFloat(v, 64)
		if err != nil || parsed <= 0 {
			log.Fatalf("%s=%q: not a positive number of seconds", name, v)
		}
		value = parsed
	}
	return time.Duration(value * float64(time.Second))
}

// incomingHeader passes the caller's X-Request-Id and W3C trace context (traceparent,
// tracestate) on as gRPC metadata, so that the server's log lines and spans join the BFF's
// request. No other header: the server reads none, and each one forwarded counts against its
// metadata size limit. Authorization and X-Forwarded-For go through runtime.AnnotateContext.
func incomingHeader(key string) (string, bool) {
	for _, name := range incomingHeaders {
		if key == name {
			return strings.ToLower(key), true
		}
	}
	return "", false
}

// outgoingHeader forwards header metadata of responseHeaders under their own names, which the
// BFF reads, and no other: grpc-gateway's default would pass every key on as Grpc-Metadata-*.
func outgoingHeader(key string) (string, bool) {
	return key, responseHeaders[key]
}

// errNotModified is what forwardResponse answers for a feed page the client holds already:
// grpc-gateway v1 then hands it to runtime.HTTPError instead of writing the body, and
// httpError writes a bodiless 304.
var errNotModified = errors.New("not modified")

// errTooLarge answers a body over maxRequestBytes, with 413 rather than the 400 of its gRPC
// code. As errHeadersTooLarge, it is INVALID_ARGUMENT, the code of the other requests the
// gateway refuses.
var errTooLarge = gatewayError(codes.InvalidArgument, "REQUEST_TOO_LARGE",
	fmt.Sprintf("the request body is larger than %d bytes", maxRequestBytes))

// httpError is runtime.HTTPError: the error body of grpc-gateway, whose details are the
// server's, with the rate-limit and request-id trailers as headers.
func httpError(ctx context.Context, mux *runtime.ServeMux, m runtime.Marshaler, w http.ResponseWriter, r *http.Request, err error) {
	if err == errNotModified {
		// forwardResponse copied the trailers already. No body: drop what announced one
		// (ForwardResponseMessage set them before the options ran).
		w.Header().Del("Content-Type")
		w.Header().Del("Trailer")
		w.WriteHeader(http.StatusNotModified)
		return
	}
	copyTrailers(ctx, w)
	echoRequestID(w, r)
	retryAfter(w, err)
	if status.Code(err) == codes.Unauthenticated {
		w.Header().Set("WWW-Authenticate", bearerChallenge(r))
	}
	if err == errTooLarge || bodyTooLarge(r) {
		runtime.DefaultHTTPError(ctx, mux, m, statusWriter{w, http.StatusRequestEntityTooLarge}, r, errTooLarge)
		return
	}
	runtime.DefaultHTTPError(ctx, mux, m, w, r, withoutInternals(r, err))
}

// echoRequestID answers the client's X-Request-Id on an error no server call answered (one the
// gateway refuses itself, a body grpc-gateway cannot decode, a server it cannot reach), as the
// server's answers carry it: the BFF finds every answer, these too, by the id it logged.
func echoRequestID(w http.ResponseWriter, r *http.Request) {
	if w.Header().Get("X-Request-Id") != "" {
		return
	}
	if id := r.Header.Get("X-Request-Id"); id != "" && printableASCII(id) {
		w.Header().Set("X-Request-Id", id)
	}
}

// retryAfter gives an error whose RetryInfo says when to retry (SERVER_BUSY, a 503) the
// Retry-After header HTTP clients wait by (RFC 9110 10.2.3), the tus endpoint's for the same
// refusal, unless the server sent one as a trailer (its rate limits do). RetryInfo is the gRPC
// clients' contract, and no trailer repeats it.
func retryAfter(w http.ResponseWriter, err error) {
	if w.Header().Get("Retry-After") != "" {
		return
	}
	s, _ := status.FromError(err)
	for _, detail := range s.Details() {
		if info, ok := detail.(*errdetails.RetryInfo); ok {
			delay := info.GetRetryDelay()
			seconds := delay.GetSeconds()
			if delay.GetNanos() > 0 {
				seconds++ // Retry-After is whole seconds: never earlier than asked
			}
			w.Header().Set("Retry-After", strconv.FormatInt(seconds, 10))
			return
		}
	}
}

// bearerChallenge is the WWW-Authenticate header every 401 must carry (RFC 9110 15.5.2; Jetty's
// HttpClient fails a call whose 401 has none): the Bearer scheme (RFC 6750), with
// error="invalid_token" when the request carried a bearer token, which the server refused.
func bearerChallenge(r *http.Request) string {
	scheme, _, _ := strings.Cut(r.Header.Get("Authorization"), " ")
	if strings.EqualFold(scheme, "Bearer") {
		return `Bearer realm="mediavault", error="invalid_token"`
	}
	return `Bearer realm="mediavault"`
}

// gatewayError is an error the gateway answers itself, in the server's shape: one ErrorInfo
// of domain mediavault, whose reason clients switch on.
func gatewayError(code codes.Code, reason, message string) error {
	s, err := status.New(code, message).WithDetails(&errdetails.ErrorInfo{Reason: reason, Domain: "mediavault"})
	if err != nil {
		panic(err) // an ErrorInfo always marshals
	}
	return s.Err()
}

// withoutInternals keeps what the server answered, which always carries an ErrorInfo. Any other
// UNAVAILABLE or internal error comes from the connection to the server or from the gateway,
// and its message names internal addresses or types: the client gets a generic one, the log
// the error, with the path quoted: it is percent-decoded, and a %0A in it would otherwise
// start a log line of the client's making. An INVALID_ARGUMENT without one is grpc-gateway's
// own, for a body or a parameter it cannot decode into the request message: it gets the
// ErrorInfo the server's would carry.
func withoutInternals(r *http.Request, err error) error {
	s, _ := status.FromError(err)
	for _, detail := range s.Details() {
		if _, ok := detail.(*errdetails.ErrorInfo); ok {
			return err
		}
	}
	switch s.Code() {
	case codes.InvalidArgument:
		return gatewayError(codes.InvalidArgument, "INVALID_ARGUMENT", s.Message())
	case codes.Unavailable:
		log.Printf("%s %q: %v", r.Method, r.URL.Path, err)
		return gatewayError(codes.Unavailable, "UNAVAILABLE", "the service is unavailable; retry")
	case codes.Unknown, codes.Internal, codes.DataLoss:
		log.Printf("%s %q: %v", r.Method, r.URL.Path, err)
		return gatewayError(codes.Internal, "INTERNAL_ERROR", "internal error")
	}
	return err
}

const (
	uploadContentRPC = "/mediavault.storage.v1.StorageService/UploadContent"
	listFeedRPC      = "/mediavault.media.v1.MediaService/ListFeed"
	getMediaRPC      = "/mediavault.media.v1.MediaService/GetMedia"
)

// handleUploadContent serves UploadContent's routes in place of the generated handler, which
// answered the error of the Send that found the stream closed (io.EOF: the server had answered
// already, for an unknown or finalized upload or a refused chunk) as a 500 instead of the
// server's status, and read the whole body into memory before sending its first message.
func handleUploadContent(mux *runtime.ServeMux, uploadContentRoutes routes, client storagev1.StorageServiceClient) {
	if len(uploadContentRoutes) == 0 {
		log.Fatalf("%s has no google.api.http route for its handler to serve", uploadContentRPC)
	}
	handler := func(w http.ResponseWriter, req *http.Request, _ map[string]string) {
		ctx, cancel := context.WithCancel(req.Context())
		defer cancel()
		inbound, outbound := runtime.MarshalerForRequest(mux, req)
		rctx, err := runtime.AnnotateContext(ctx, mux, req)
		if err != nil {
			runtime.HTTPError(ctx, mux, outbound, w, req, err)
			return
		}
		resp, md, err := uploadContent(rctx, inbound, client, req.Body)
		ctx = runtime.NewServerMetadataContext(ctx, md)
		if err != nil {
			runtime.HTTPError(ctx, mux, outbound, w, req, err)
			return
		}
		runtime.ForwardResponseMessage(ctx, mux, outbound, w, req, resp, mux.GetForwardResponseOptions()...)
	}
	for _, r := range uploadContentRoutes {
		mux.Handle(r.method, r.pattern, handler)
	}
}

// uploadContent sends the body's messages, one JSON object after another, as they are decoded,
// and answers what the server answers: once it has, the rest of the body is not read.
func uploadContent(ctx context.Context, marshaler runtime.Marshaler, client storagev1.StorageServiceClient,
	body io.Reader) (proto.Message, runtime.ServerMetadata, error) {
	var md runtime.ServerMetadata
	stream, err := client.UploadContent(ctx)
	if err != nil {
		return nil, md, err
	}
	decoder := marshaler.NewDecoder(body)
	for {
		var message storagev1.UploadContentRequest
		err = decoder.Decode(&message)
		if err == io.EOF {
			break
		}
		if err != nil {
			return nil, md, status.Errorf(codes.InvalidArgument, "%v", err)
		}
		if err = stream.Send(&message); err == io.EOF {
			break
		} else if err != nil {
			return nil, md, err
		}
	}
	if err = stream.CloseSend(); err != nil {
		return nil, md, err
	}
	if md.HeaderMD, err = stream.Header(); err != nil {
		return nil, md, err
	}
	resp, err := stream.CloseAndRecv()
	md.TrailerMD = stream.Trailer()
	return resp, md, err
}

// statusWriter writes its status instead of the one grpc-gateway derives from the gRPC code,
// for answers no gRPC code maps to.
type statusWriter struct {
	http.ResponseWriter
	status int
}

func (w statusWriter) WriteHeader(int) { w.ResponseWriter.WriteHeader(w.status) }

// limitBody answers 413 to a body declared larger than maxRequestBytes before reading any of it,
// and stops reading an undeclared (chunked) one there; bodyTooLarge then tells httpError.
func limitBody(mux *runtime.ServeMux, next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.ContentLength > maxRequestBytes {
			reject(mux, w, r, errTooLarge)
			return
		}
		r.Body = http.MaxBytesReader(w, r.Body, maxRequestBytes)
		next.ServeHTTP(w, r)
	})
}

// bodyTooLarge tells whether reading the body stopped at maxRequestBytes: the generated code
// keeps only the text of http.MaxBytesReader's error, which the reader returns again on any Read.
func bodyTooLarge(r *http.Request) bool {
	var tooLarge *http.MaxBytesError
	_, err := r.Body.Read(nil)
	return errors.As(err, &tooLarge)
}

// reject answers err before the request reaches the mux, as the mux answers a call's error.
func reject(mux *runtime.ServeMux, w http.ResponseWriter, r *http.Request, err error) {
	_, outbound := runtime.MarshalerForRequest(mux, r)
	runtime.HTTPError(r.Context(), mux, outbound, w, r, err)
}

// routingError is what runtime.OtherErrorHandler and routedAsSent answer, in the JSON shape of
// every other error rather than grpc-gateway's plain text: a path no route matches (404
// NOT_FOUND), a method the path's routes do not take (405 METHOD_NOT_ALLOWED, with the Allow
// header RFC 9110 15.5.6 requires), a path the mux cannot read (400).
func routingError(mux *runtime.ServeMux, routes routes, w http.ResponseWriter, r *http.Request, httpStatus int) {
	switch httpStatus {
	case http.StatusNotFound:
		reject(mux, w, r, gatewayError(codes.NotFound, "NOT_FOUND", "no route for "+r.Method+" "+r.URL.Path))
	case http.StatusMethodNotAllowed:
		w.Header().Set("Allow", strings.Join(routes.allowed(r.URL.Path), ", "))
		reject(mux, statusWriter{w, http.StatusMethodNotAllowed}, r, gatewayError(codes.Unimplemented, "METHOD_NOT_ALLOWED",
			r.Method+" is not a method of "+r.URL.Path))
	default:
		reject(mux, statusWriter{w, httpStatus}, r, gatewayError(codes.InvalidArgument, "INVALID_ARGUMENT", http.StatusText(httpStatus)))
	}
}

// route is a google.api.http binding of a method of the services: the HTTP method and path
// pattern of the handler grpc-gateway generated for it, and the gRPC method it calls.
type route struct {
	method  string
	pattern runtime.Pattern
	rpc     string // as the gRPC client names it: /mediavault.storage.v1.StorageService/UploadContent
}

// routes is what the mux serves, in the order the generated code registers it. grpc-gateway v1's
// ServeMux keeps its routes to itself and tells OtherErrorHandler only that another method's
// route matched, not which: a 405's Allow header and headAsGet read them here.
type routes []route

// annotatedRoutes reads the routes of the services of files from the google.api.http options of
// their methods, additional_bindings too, each path template compiled as protoc-gen-grpc-gateway
// compiled it into the handler it generated from these very options: the mux and this table
// cannot disagree, whatever a grpc-gateway upgrade does to the mux's insides.
func annotatedRoutes(files ...*descpb.FileDescriptorProto) (routes, error) {
	var table routes
	for _, file := range files {
		for _, service := range file.GetService() {
			for _, method := range service.GetMethod() {
				if method.GetOptions() == nil || !proto.HasExtension(method.GetOptions(), annotations.E_Http) {
					continue
				}
				rpc := "/" + file.GetPackage() + "." + service.GetName() + "/" + method.GetName()
				extension, err := proto.GetExtension(method.GetOptions(), annotations.E_Http)
				if err != nil {
					return nil, fmt.Errorf("%s: %v", rpc, err)
				}
				rule := extension.(*annotations.HttpRule)
				for _, binding := range append([]*annotations.HttpRule{rule}, rule.GetAdditionalBindings()...) {
					httpMethod, template := httpBinding(binding)
					if template == "" {
						continue // no route: the generator makes none either
					}
					parsed, err := httprule.Parse(template)
					if err != nil {
						return nil, fmt.Errorf("%s: %v", rpc, err)
					}
					compiled := parsed.Compile()
					pattern, err := runtime.NewPattern(compiled.Version, compiled.OpCodes, compiled.Pool, compiled.Verb)
					if err != nil {
						return nil, fmt.Errorf("%s %s: %v", rpc, template, err)
					}
					table = append(table, route{httpMethod, pattern, rpc})
				}
			}
		}
	}
	return table, nil
}

// httpBinding is the HTTP method and path template of one google.api.http rule, read as
// protoc-gen-grpc-gateway reads them.
func httpBinding(rule *annotations.HttpRule) (method, template string) {
	switch pattern := rule.GetPattern().(type) {
	case *annotations.HttpRule_Get:
		return http.MethodGet, pattern.Get
	case *annotations.HttpRule_Put:
		return http.MethodPut, pattern.Put
	case *annotations.HttpRule_Post:
		return http.MethodPost, pattern.Post
	case *annotations.HttpRule_Delete:
		return http.MethodDelete, pattern.Delete
	case *annotations.HttpRule_Patch:
		return http.MethodPatch, pattern.Patch
	case *annotations.HttpRule_Custom:
		return pattern.Custom.GetKind(), pattern.Custom.GetPath()
	}
	return "", ""
}

// takes tells whether a route of t takes method on path, split as ServeMux.ServeHTTP splits it
// (its segments, and a verb after the last segment's last colon).
func (t routes) takes(method, path string) bool {
	components, verb := splitPath(path)
	for _, r := range t {
		if r.method == method {
			if _, err := r.pattern.Match(components, verb); err == nil {
				return true
			}
		}
	}
	return false
}

// of is the routes that call rpc.
func (t routes) of(rpc string) routes {
	var called routes
	for _, r := range t {
		if r.rpc == rpc {
			called = append(called, r)
		}
	}
	return called
}

func splitPath(path string) (components []string, verb string) {
	components = strings.Split(strings.TrimPrefix(path, "/"), "/")
	last := len(components) - 1
	if i := strings.LastIndex(components[last], ":"); i > 0 {
		components[last], verb = components[last][:i], components[last][i+1:]
	}
	return components, verb
}

// allowed is the methods whose routes match path, sorted; HEAD where GET is.
func (t routes) allowed(path string) []string {
	components, verb := splitPath(path)
	taken := map[string]bool{}
	for _, r := range t {
		if _, err := r.pattern.Match(components, verb); err == nil {
			taken[r.method] = true
		}
	}
	if taken[http.MethodGet] {
		taken[http.MethodHead] = true
	}
	methods := make([]string, 0, len(taken))
	for method := range taken {
		methods = append(methods, method)
	}
	sort.Strings(methods)
	return methods
}

// headAsGet serves HEAD on a path a GET route takes as that GET, with its status and headers
// (ETag, Vary, Content-Type...), as RFC 9110 9.3.2 asks; net/http drops the body it writes,
// since the request it answers is still the HEAD. grpc-gateway routes only the methods of the
// protos' annotations, so HEAD elsewhere is a 405 as any other method those routes do not take.
func headAsGet(routes routes, next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method == http.MethodHead {
			if routes.takes(http.MethodGet, r.URL.Path) {
				r = r.Clone(r.Context())
				r.Method = http.MethodGet
			}
		}
		next.ServeHTTP(w, r)
	})
}

// routedAsSent has the mux route a request by the method it was sent with, which every handler
// before it read, and answers 405 to a method the path's routes do not take: grpc-gateway v1
// serves a POST with a form body (application/x-www-form-urlencoded) as the method its
// X-HTTP-Method-Override names, and on a path without a POST route as another method's route,
// the first its map of methods gives (GetMedia or DeleteMedia, at random, on /v1/media/{id}).
func routedAsSent(mux *runtime.ServeMux, routes routes) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		r.Header.Del("X-HTTP-Method-Override")
		if !routes.takes(r.Method, r.URL.Path) && len(routes.allowed(r.URL.Path)) > 0 {
			routingError(mux, routes, w, r, http.StatusMethodNotAllowed)
			return
		}
		mux.ServeHTTP(w, r)
	})
}

// errHeadersTooLarge answers forwarded headers over maxForwardedBytes, with 431.
var errHeadersTooLarge = gatewayError(codes.InvalidArgument, "HEADERS_TOO_LARGE",
	fmt.Sprintf("the headers passed on to the service (%s, Host) are larger than %d bytes together",
		strings.Join(forwardedHeaders, ", "), maxForwardedBytes))

// validMetadata drops the values of forwarded headers that gRPC metadata cannot carry (printable
// ASCII only): the server would refuse the whole call, on every route, for an X-Request-Id. It
// joins the X-Forwarded-For lines into one. It answers 431 when what is left passes
// maxForwardedBytes. It drops Grpc-Timeout, which runtime.AnnotateContext would make the call's
// deadline: a client's header must not cut a call short into a 504 that carries no ErrorInfo.
func validMetadata(mux *runtime.ServeMux, next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		r.Header.Del("Grpc-Timeout")
		// The Host header is forwarded as x-forwarded-host when X-Forwarded-Host is absent.
		size := len(r.Host)
		for _, name := range forwardedHeaders {
			values := r.Header.Values(name)
			if len(values) == 0 {
				continue
			}
			kept := make([]string, 0, len(values))
			for _, v := range values {
				if printableASCII(v) {
					kept = append(kept, v)
					size += len(name) + len(v)
				}
			}
			switch {
			case len(kept) == 0:
				r.Header.Del(name)
			case name == "X-Forwarded-For":
				// Its lines are one list (RFC 9110 5.3), and a balancer in front may add its hop as a
				// line of its own below the client's; runtime.AnnotateContext forwards the first
				// line alone, the client's own text.
				r.Header.Set(name, strings.Join(kept, ", "))
			default:
				r.Header[http.CanonicalHeaderKey(name)] = kept
			}
		}
		if size > maxForwardedBytes {
			reject(mux, statusWriter{w, http.StatusRequestHeaderFieldsTooLarge}, r, errHeadersTooLarge)
			return
		}
		next.ServeHTTP(w, r)
	})
}

func printableASCII(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] < 0x20 || s[i] > 0x7e {
			return false
		}
	}
	return true
}

// decodableURL answers 400 to a query string that does not decode (a broken percent-escape, or a
// semicolon, which is no separator): URL.Query(), which grpc-gateway reads, leaves such a pair
// out without a word, and the call would run without it (the first page for a broken
// page_token). It answers 400 too to a path or query that is not UTF-8 once decoded: the request
// fields they fill are proto strings, which the gRPC client refuses to encode (a 500).
func decodableURL(mux *runtime.ServeMux, next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !utf8.ValidString(r.URL.Path) {
			reject(mux, w, r, gatewayError(codes.InvalidArgument, "INVALID_ARGUMENT", "the path is not UTF-8"))
			return
		}
		query, err := url.ParseQuery(r.URL.RawQuery)
		if err != nil {
			reject(mux, w, r, gatewayError(codes.InvalidArgument, "INVALID_ARGUMENT", "the query string does not decode: "+err.Error()))
			return
		}
		for key, values := range query {
			valid := utf8.ValidString(key)
			for _, v := range values {
				valid = valid && utf8.ValidString(v)
			}
			if !valid {
				reject(mux, w, r, gatewayError(codes.InvalidArgument, "INVALID_ARGUMENT",
					fmt.Sprintf("the query parameter %q is not UTF-8", key)))
				return
			}
		}
		next.ServeHTTP(w, r)
	})
}

// forwardResponse runs before a successful response is written: the rate-limit and request-id
// trailers become headers, and a feed page's etag becomes the ETag header; a page the server
// found unchanged, or whose etag is among those ifNoneMatch read, is a 304 Not Modified. The
// ETag is weak (RFC 9110 8.8.1): each answer signs its URLs anew, so two answers with one etag
// are equivalent, not the same bytes.
func forwardResponse(ctx context.Context, w http.ResponseWriter, resp proto.Message) error {
	copyTrailers(ctx, w)
	if feed, ok := resp.(*mediav1.ListFeedResponse); ok {
		w.Header().Set("ETag", `W/"`+feed.Etag+`"`)
		if feed.NotModified || held(ctx, feed.Etag) {
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

type heldETagsKey struct{}

// heldETags is what If-None-Match names: opaque tags, or any page (a bare *).
type heldETags struct {
	opaque []string
	any    bool
}

// ifNoneMatch reads If-None-Match on the feed's routes. A single etag also goes to the server as
// the if_none_match query parameter (grpc-gateway v1 binds path, query and body to request
// fields, never a header), which then leaves the page out; forwardResponse compares a list, or
// *, itself.
func ifNoneMatch(feed routes, next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !feed.takes(r.Method, r.URL.Path) {
			next.ServeHTTP(w, r)
			return
		}
		if named := entityTags(r.Header.Values("If-None-Match")); named.any || len(named.opaque) > 0 {
			if len(named.opaque) == 1 && !named.any {
				query := r.URL.Query()
				query.Set("if_none_match", named.opaque[0])
				r.URL.RawQuery = query.Encode()
			}
			r = r.WithContext(context.WithValue(r.Context(), heldETagsKey{}, named))
		}
		next.ServeHTTP(w, r)
	})
}

// entityTags reads If-None-Match values for the weak comparison (RFC 9110 8.8.3.2): W/ and the
// quotes stripped. Only a bare * is the wildcard (RFC 9110 13.1.2); a quoted "*" is an entity-tag
// as any other. An entry that is not UTF-8 is no etag of the gateway's, left out.
func entityTags(headers []string) heldETags {
	var named heldETags
	for _, header := range headers {
		for _, entry := range strings.Split(header, ",") {
			entry = strings.TrimSpace(entry)
			if entry == "*" {
				named.any = true
				continue
			}
			etag := strings.TrimPrefix(entry, "W/")
			if len(etag) >= 2 && strings.HasPrefix(etag, `"`) && strings.HasSuffix(etag, `"`) {
				etag = etag[1 : len(etag)-1]
			}
			if etag != "" && utf8.ValidString(etag) {
				named.opaque = append(named.opaque, etag)
			}
		}
	}
	return named
}

// held tells whether the client's If-None-Match names the page's etag, or is *.
func held(ctx context.Context, etag string) bool {
	named, _ := ctx.Value(heldETagsKey{}).(heldETags)
	if named.any {
		return true
	}
	for _, e := range named.opaque {
		if e == etag {
			return true
		}
	}
	return false
}

// acceptedFormats puts the Accept header's image media ranges, as the client wrote them, into
// the accept query parameters of the routes of variants (the feed's and GetMedia's), unless
// the query names some itself, and marks those responses Vary: Accept, since the variants'
// formats follow it. The server ranks them (q values, wildcards: src/mediavault/domain/formats.py).
func acceptedFormats(variants routes, next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if variants.takes(r.Method, r.URL.Path) {
			// The answer is the caller's too (the owner's has the originals' URLs): no shared cache may keep it.
			w.Header().Set("Vary", "Accept, Authorization")
			w.Header().Set("Cache-Control", "private")
			query := r.URL.Query()
			if _, named := query["accept"]; !named {
				if ranges := imageRanges(r.Header.Values("Accept")); len(ranges) > 0 {
					query["accept"] = ranges
					r.URL.RawQuery = query.Encode()
				}
			}
		}
		next.ServeHTTP(w, r)
	})
}

// imageRanges is the entries of Accept header values that can name an image (image/... and
// */*), with their parameters, in the header's order. The others are left out so that a long
// browser header does not push the image ranges past the entries the server reads, and so are
// entries that are not ASCII text, whose optional whitespace around ";" may be SP or HTAB
// (RFC 9110 5.6.3): the server reads both.
func imageRanges(headers []string) []string {
	var ranges []string
	for _, header := range headers {
		for _, entry := range strings.Split(header, ",") {
			entry = strings.TrimSpace(entry)
			mediaRange, _, _ := strings.Cut(entry, ";")
			mediaRange = strings.ToLower(strings.TrimSpace(mediaRange))
			if asciiText(entry) && (mediaRange == "*/*" || strings.HasPrefix(mediaRange, "image/")) {
				ranges = append(ranges, entry)
			}
		}
	}
	return ranges
}

// asciiText tells whether s is printable ASCII or HTAB, the ASCII an HTTP field value holds.
func asciiText(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] != '\t' && (s[i] < 0x20 || s[i] > 0x7e) {
			return false
		}
	}
	return true
}
