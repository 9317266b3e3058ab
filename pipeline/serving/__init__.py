"""The local endpoint: model loading, the HTTP server, micro-batching, bulk prediction."""
