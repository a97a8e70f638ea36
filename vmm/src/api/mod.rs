//! HTTP/1.1 + JSON control API over a unix socket (owned by the API helper).
