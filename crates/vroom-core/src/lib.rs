//! vroom-core: the lifecycle engine and the seams it drives.
//!
//! Core knows no HTTP, QMP, netlink or etcd. It talks to VMs through
//! [`driver::VmDriver`], to the host network through [`net::NetworkBackend`],
//! to persistent state through [`store::StateStore`] and to images through
//! [`images::ImageSource`]; the `vroom` binary wires real implementations in.

pub mod agent;
mod blocking;
pub mod cluster;
pub mod console;
pub mod driver;
pub mod engine;
pub mod error;
pub mod events;
pub mod images;
pub mod ipam;
pub mod lifecycle;
pub mod metrics;
pub mod net;
pub mod ratelimit;
pub mod service;
pub mod store;
/// In-memory fakes of the seams, for tests: compiled into the crate's own
/// tests, and into other crates' tests through the `testing` feature (enabled
/// as a dev-dependency feature), never into the product.
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod wiring;

pub use engine::{Arrival, ArrivalChecks, Engine, EngineConfig, LiveOutgoing};
pub use error::OpError;
