//! Services: a group of instances of one image behind a load balancer
//! appliance (the catalog's `lb`), kept at a number of members by vroomd:
//! a member that fails is replaced, a scale changes the number, and the
//! balancer lists exactly the members that are up.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use crate::{InstanceState, Name};

/// The most members a service may have.
pub const MAX_SERVICE_REPLICAS: u32 = 64;

/// The longest service name: its members (`NAME-N`, N never reused, up to
/// seven digits) and balancer (`NAME-lb`) must be valid names too.
pub const MAX_SERVICE_NAME_LEN: usize = 24;

/// What a service is asked to be (`vroom service create`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ServiceDefinition {
    /// At most 24 characters (its members are NAME-N, its balancer NAME-lb).
    #[cfg_attr(feature = "openapi", schema(value_type = String, pattern = "^[a-z]([a-z0-9-]{0,22}[a-z0-9])?$", min_length = 1, max_length = 24))]
    pub name: Name,
    /// The members' image.
    #[cfg_attr(feature = "openapi", schema(min_length = 1))]
    pub image: String,
    /// How many members it keeps (1 to 64).
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 64))]
    #[serde(deserialize_with = "crate::json_int::required")]
    pub replicas: u32,
    /// The network its members and its balancer are on.
    pub network: Name,
    /// The port the members serve and the balancer listens on.
    #[serde(
        default = "default_port",
        deserialize_with = "crate::json_int::required"
    )]
    #[cfg_attr(
        feature = "openapi",
        schema(minimum = 1, maximum = 65535, default = 80)
    )]
    pub port: u16,
}

fn default_port() -> u16 {
    80
}

/// The service as kept in the state store: its spec, its members by name,
/// and whether it is being removed. A member's name is recorded before its
/// instance is made, so a daemon killed in between finds it again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceRecord {
    pub spec: ServiceDefinition,
    pub members: Vec<Name>,
    /// The number the next member's name gets (`NAME-N`): never reused.
    pub next: u32,
    /// Being removed: members, then the balancer, then this record go.
    #[serde(default)]
    pub removing: bool,
    pub created_at: u64,
}

/// One member as `service inspect` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ServiceMember {
    pub name: Name,
    /// Its instance's state; absent while it is being made.
    pub state: Option<InstanceState>,
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>, format = Ipv4))]
    pub ip: Option<Ipv4Addr>,
    /// The balancer sends it requests.
    pub balanced: bool,
}

/// A service as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Service {
    pub spec: ServiceDefinition,
    /// The balancer's instance (`NAME-lb`).
    pub balancer: Name,
    /// The service's address: its balancer's.
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>, format = Ipv4))]
    pub address: Option<Ipv4Addr>,
    pub members: Vec<ServiceMember>,
    /// Members running and balanced.
    pub ready: u32,
    pub removing: bool,
    pub created_at: u64,
}

/// `POST /v1/services/{name}/scale`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ServiceScaleRequest {
    /// 1 to 64.
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 64))]
    #[serde(deserialize_with = "crate::json_int::required")]
    pub replicas: u32,
}

/// The name of `service`'s balancer.
pub fn balancer_name(service: &Name) -> Name {
    Name::new(&format!("{service}-lb")).expect("invariant: service names leave room")
}

/// The name of `service`'s member number `n`.
pub fn member_name(service: &Name, n: u32) -> Name {
    Name::new(&format!("{service}-{n}")).expect("invariant: service names leave room")
}

/// Whether an instance named `instance` would take a name a service
/// `service` gives its members or its balancer.
pub fn is_service_name(service: &str, instance: &str) -> bool {
    instance.strip_prefix(service).is_some_and(|rest| {
        rest == "-lb"
            || rest
                .strip_prefix('-')
                .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn member_and_balancer_names_belong_to_their_service() {
        let shop: Name = "shop".parse().unwrap();
        assert_eq!(member_name(&shop, 3).as_str(), "shop-3");
        assert_eq!(balancer_name(&shop).as_str(), "shop-lb");
        assert!(is_service_name("shop", "shop-3"));
        assert!(is_service_name("shop", "shop-lb"));
        assert!(!is_service_name("shop", "shop-db"));
        assert!(!is_service_name("shop", "shop-"));
        assert!(!is_service_name("shop", "shopping-1"));
        assert!(!is_service_name("shop", "shop"));
        let long: Name = "a".repeat(MAX_SERVICE_NAME_LEN).parse().unwrap();
        assert_eq!(member_name(&long, 9_999_999).as_str().len(), 32);
    }
}
