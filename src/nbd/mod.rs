//! The NBD server: protocol encoding ([`wire`]), option haggling ([`handshake`]), the data
//! path of one connection ([`session`]), listeners ([`server`]), TLS over TCP ([`tls`]), and a
//! small client.
//! Spec: <https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md>.

pub mod admission;
pub mod blockstatus;
pub mod bufpool;
pub mod client;
pub mod conn;
pub mod forward;
pub mod handshake;
pub mod server;
pub mod session;
pub mod tls;
pub mod tx;
pub mod wire;
