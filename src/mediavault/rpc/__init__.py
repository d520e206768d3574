"""gRPC servicers: proto in, domain call, proto out. Nothing else lives here."""
