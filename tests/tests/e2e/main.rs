//! End-to-end tests: real services in-process on port 0, real WebSocket and
//! gRPC clients. One test binary, one module per area.

mod abuse;
mod agents;
mod auth;
mod bad_input;
mod bridges;
mod bus;
mod channels;
mod cli;
mod cluster;
mod console;
mod existing_clients;
mod frames_prop;
mod http_api;
mod openai;
mod presence;
mod recovery;
mod relink;
mod security;
mod shutdown;
mod slow_consumer;
mod socketio;
mod sse;
mod tls;
mod workers;
