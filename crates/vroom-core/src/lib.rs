//! vroom-core: the lifecycle engine and the seams it drives.
//!
//! Core knows no HTTP, QMP, netlink or etcd. It talks to VMs through
//! [`driver::VmDriver`], to the host network through [`net::NetworkBackend`],
//! to persistent state through [`store::StateStore`] and to images through
//! [`images::ImageSource`]; the `vroom` binary wires real implementations in.

pub mod agent;
pub mod cluster;
pub mod console;
pub mod driver;
pub mod engine;
pub mod error;
pub mod images;
pub mod input;
pub mod ipam;
pub mod lifecycle;
pub mod net;
pub mod ratelimit;
pub mod service;
pub mod store;
pub mod testing;
pub mod wiring;

pub use engine::{Arrival, ArrivalChecks, Engine, EngineConfig, LiveOutgoing};
pub use error::OpError;
