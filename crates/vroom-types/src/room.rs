//! Server rooms: one tenant's isolated networks (lan, dmz) behind its own
//! firewall appliance, with DHCP and DNS on lan, and ports exposed on the
//! firewall's wan side by instance name.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use crate::{InvalidInputError, Name, Protocol, ScaleTarget, ServiceDefinition};

/// The longest room name: its networks and firewall (`NAME-lan`, `NAME-dmz`,
/// `NAME-fw`) must be valid names too.
pub const MAX_ROOM_NAME_LEN: usize = 28;

/// A room's name: a [`Name`] short enough for its suffixes.
pub fn check_room_name(name: &Name) -> Result<(), InvalidInputError> {
    if name.as_str().len() > MAX_ROOM_NAME_LEN {
        return Err(InvalidInputError::RoomName {
            raw: name.to_string(),
        });
    }
    Ok(())
}

/// The two segments a room has behind its firewall.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum Segment {
    Lan,
    Dmz,
}

impl Segment {
    pub fn as_str(self) -> &'static str {
        match self {
            Segment::Lan => "lan",
            Segment::Dmz => "dmz",
        }
    }

    /// The network of this segment in room `room`.
    pub fn network(self, room: &Name) -> Name {
        Name::new(&format!("{room}-{}", self.as_str())).expect("invariant: room names leave room")
    }
}

impl FromStr for Segment {
    type Err = InvalidInputError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "lan" => Ok(Segment::Lan),
            "dmz" => Ok(Segment::Dmz),
            _ => Err(InvalidInputError::Choice {
                what: "segment",
                raw: s.to_string(),
                choices: "lan, dmz",
            }),
        }
    }
}

impl fmt::Display for Segment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The subnets a room's networks are to have (`--subnet lan=10.9.1.0/24`,
/// `[networks]` in a room file); a free /24 is chosen for lan and dmz
/// when absent.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct RoomNetworks {
    /// The subnet the wan network has: checked against an existing one,
    /// or given to `default` when the room makes it.
    #[cfg_attr(feature = "openapi", schema(schema_with = crate::network::subnet_schema))]
    #[serde(
        default,
        deserialize_with = "crate::network::deserialize_subnet",
        skip_serializing_if = "Option::is_none"
    )]
    pub wan: Option<Ipv4Net>,
    #[cfg_attr(feature = "openapi", schema(schema_with = crate::network::subnet_schema))]
    #[serde(
        default,
        deserialize_with = "crate::network::deserialize_subnet",
        skip_serializing_if = "Option::is_none"
    )]
    pub lan: Option<Ipv4Net>,
    #[cfg_attr(feature = "openapi", schema(schema_with = crate::network::subnet_schema))]
    #[serde(
        default,
        deserialize_with = "crate::network::deserialize_subnet",
        skip_serializing_if = "Option::is_none"
    )]
    pub dmz: Option<Ipv4Net>,
}

impl RoomNetworks {
    /// Only a map of role to subnet: serde would take a struct from a
    /// sequence too (`[null, null]`), which is no way to name subnets.
    fn from_map<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct MapOnly;
        impl<'de> serde::de::Visitor<'de> for MapOnly {
            type Value = RoomNetworks;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a map of network role (wan, lan, dmz) to subnet")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<RoomNetworks, A::Error> {
                RoomNetworks::deserialize(serde::de::value::MapAccessDeserializer::new(map))
            }
        }
        d.deserialize_map(MapOnly)
    }
}

impl RoomNetworks {
    pub fn is_empty(&self) -> bool {
        *self == RoomNetworks::default()
    }

    /// Sets one role's subnet from `ROLE=CIDR` (`--subnet lan=10.9.1.0/24`).
    pub fn set(&mut self, raw: &str) -> Result<(), InvalidInputError> {
        let invalid = || InvalidInputError::Choice {
            what: "subnet role",
            raw: raw.to_string(),
            choices: "wan=CIDR, lan=CIDR, dmz=CIDR",
        };
        let (role, cidr) = raw.split_once('=').ok_or_else(invalid)?;
        let slot = match role {
            "wan" => &mut self.wan,
            "lan" => &mut self.lan,
            "dmz" => &mut self.dmz,
            _ => return Err(invalid()),
        };
        *slot = Some(crate::parse_subnet(cidr)?);
        Ok(())
    }

    /// The subnets asked for, by role.
    pub fn given(&self) -> Vec<(&'static str, Ipv4Net)> {
        [("wan", self.wan), ("lan", self.lan), ("dmz", self.dmz)]
            .into_iter()
            .filter_map(|(role, net)| Some((role, net?)))
            .collect()
    }
}

/// The body of `POST /v1/rooms`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct RoomSpec {
    /// At most 28 characters (its networks are NAME-lan and NAME-dmz, its firewall NAME-fw).
    #[cfg_attr(feature = "openapi", schema(value_type = String, pattern = "^[a-z]([a-z0-9-]{0,26}[a-z0-9])?$", min_length = 1, max_length = 28))]
    pub name: Name,
    /// The network the firewall's wan NIC is on; `default` (NAT) when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wan: Option<Name>,
    /// The subnets of its networks; free ones when absent.
    #[serde(
        default,
        deserialize_with = "RoomNetworks::from_map",
        skip_serializing_if = "RoomNetworks::is_empty"
    )]
    pub networks: RoomNetworks,
}

/// A port forward from the firewall's wan side to a room instance.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Expose {
    /// The port on the firewall's wan address.
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 65535))]
    #[serde(deserialize_with = "crate::json_int::required")]
    pub port: u16,
    #[serde(default)]
    pub proto: Protocol,
    /// The room instance it reaches (its address is looked up, and followed).
    pub to: Name,
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 65535))]
    #[serde(deserialize_with = "crate::json_int::required")]
    pub to_port: u16,
}

impl Expose {
    pub fn check(&self) -> Result<(), InvalidInputError> {
        if self.port == 0 || self.to_port == 0 {
            return Err(InvalidInputError::ExposePort);
        }
        Ok(())
    }
}

/// Where a room stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum RoomState {
    /// Its networks and firewall are being made.
    Creating,
    Ready,
    /// Being removed, with everything in it.
    Removing,
}

impl fmt::Display for RoomState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RoomState::Creating => "creating",
            RoomState::Ready => "ready",
            RoomState::Removing => "removing",
        })
    }
}

/// A room as recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Room {
    pub name: Name,
    /// The network of the firewall's wan NIC.
    pub wan: Name,
    pub lan: Name,
    pub dmz: Name,
    /// The firewall instance (`NAME-fw`).
    pub firewall: Name,
    /// The DNS domain of the room's instances on lan and dmz (`NAME.lan`).
    pub domain: String,
    pub exposes: Vec<Expose>,
    pub state: RoomState,
    pub created_at: u64,
}

impl Room {
    pub fn network(&self, segment: Segment) -> &Name {
        match segment {
            Segment::Lan => &self.lan,
            Segment::Dmz => &self.dmz,
        }
    }

    /// The segment a network is of this room, if it is its lan or dmz.
    pub fn segment_of(&self, network: &str) -> Option<Segment> {
        [Segment::Lan, Segment::Dmz]
            .into_iter()
            .find(|s| self.network(*s).as_str() == network)
    }
}

/// How a NIC is labelled for people: by the segment of the room network
/// it is on (an instance in a dmz is `dmz`, whatever its image calls its
/// NIC), else by its role.
pub fn nic_label<'a>(rooms: &[Room], network: &str, role: Option<&'a str>) -> Option<&'a str> {
    rooms
        .iter()
        .find_map(|r| r.segment_of(network))
        .map(Segment::as_str)
        .or(role)
}

/// The body of `POST /v1/rooms/{name}/exposes`.
pub type ExposeRequest = Expose;

/// One instance in a room file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct RoomInstance {
    /// An image name (newest of that name) or id.
    pub image: String,
    pub segment: Segment,
    /// Guest memory in MiB; the image's default when absent.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crate::json_int::optional"
    )]
    #[cfg_attr(feature = "openapi", schema(minimum = 64, maximum = 1073741824))]
    pub mem_mib: Option<u64>,
    /// Config keys to set (the others keep the image's defaults).
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(value_type = BTreeMap<String, String>))]
    pub config: BTreeMap<String, String>,
}

/// A room as a file declares it (`vroom room apply FILE`, TOML).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct RoomFile {
    /// The room's name, at most 28 characters.
    #[cfg_attr(feature = "openapi", schema(value_type = String, pattern = "^[a-z]([a-z0-9-]{0,26}[a-z0-9])?$", min_length = 1, max_length = 28))]
    pub name: Name,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wan: Option<Name>,
    /// The subnets of the room's networks (`[networks] lan = "10.9.1.0/24"`);
    /// they cannot change once the room exists.
    #[serde(
        default,
        deserialize_with = "RoomNetworks::from_map",
        skip_serializing_if = "RoomNetworks::is_empty"
    )]
    pub networks: RoomNetworks,
    /// Config keys of the room's firewall to set (wan policy, DHCP pool...);
    /// `hosts` and `forward` are vroom's (from the instances and exposes).
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(value_type = BTreeMap<String, String>))]
    pub firewall: BTreeMap<String, String>,
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(value_type = BTreeMap<String, RoomInstance>))]
    pub instances: BTreeMap<Name, RoomInstance>,
    #[serde(default)]
    pub expose: Vec<Expose>,
    /// Services on the room's lan (`[[services]]`): each answers to its
    /// name in the room's DNS.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<RoomService>,
}

/// One service of a room file (`[[services]]`): members of one image on
/// the room's lan behind a balancer, as `vroom service create --room`
/// makes them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct RoomService {
    /// At most 24 characters (its members are NAME-N, its balancer NAME-lb).
    #[cfg_attr(feature = "openapi", schema(value_type = String, pattern = "^[a-z]([a-z0-9-]{0,22}[a-z0-9])?$", min_length = 1, max_length = 24))]
    pub name: Name,
    /// The members' image (a new one is a rolling update).
    #[cfg_attr(feature = "openapi", schema(min_length = 1))]
    pub image: String,
    /// How many members: `N`, or `"MIN..MAX"` for the autoscaler (with
    /// `slo` or `target_cpu`); 1 when absent.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(schema_with = replicas_schema))]
    pub replicas: Replicas,
    /// The port the members serve and the balancer listens on.
    #[serde(
        default = "crate::service::default_port",
        deserialize_with = "crate::json_int::required"
    )]
    #[cfg_attr(
        feature = "openapi",
        schema(minimum = 1, maximum = 65535, default = 80)
    )]
    pub port: u16,
    /// The latency the autoscaler keeps, like `p95<50ms`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slo: Option<String>,
    /// The members' CPU use the autoscaler keeps, like `60%`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_cpu: Option<String>,
    /// Every member boots (by default they start from the image's warm
    /// snapshot).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cold: bool,
}

impl RoomService {
    /// The service this entry asks for in room `room`; a target that does
    /// not parse, or both targets, is refused naming the field.
    pub fn definition(&self, room: &Name) -> Result<ServiceDefinition, String> {
        let target = |field: &str, raw: &Option<String>| {
            raw.as_deref()
                .map(|r| {
                    r.parse::<ScaleTarget>()
                        .map_err(|e| format!("{field}: {e}"))
                })
                .transpose()
        };
        let scale_on = match (
            target("slo", &self.slo)?,
            target("target_cpu", &self.target_cpu)?,
        ) {
            (Some(_), Some(_)) => return Err("give slo or target_cpu, not both".into()),
            (Some(t @ ScaleTarget::P95Ms(_)), None) => Some(t),
            (None, Some(t @ ScaleTarget::CpuPercent(_))) => Some(t),
            (Some(t), None) => return Err(format!("slo: takes a latency like p95<50ms, not {t}")),
            (None, Some(t)) => {
                return Err(format!("target_cpu: takes a percentage like 60%, not {t}"))
            }
            (None, None) => None,
        };
        Ok(ServiceDefinition {
            name: self.name.clone(),
            image: self.image.clone(),
            replicas: self.replicas.min,
            max_replicas: self.replicas.max,
            network: None,
            room: Some(room.clone()),
            port: self.port,
            scale_on,
            warm: !self.cold,
        })
    }
}

/// A number of members, `N`, or the autoscaler's bounds, `"MIN..MAX"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Replicas {
    pub min: u32,
    pub max: Option<u32>,
}

impl Default for Replicas {
    fn default() -> Self {
        Replicas { min: 1, max: None }
    }
}

impl fmt::Display for Replicas {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.max {
            Some(max) => write!(f, "{}..{max}", self.min),
            None => write!(f, "{}", self.min),
        }
    }
}

impl Serialize for Replicas {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.max {
            None => s.serialize_u32(self.min),
            Some(_) => s.collect_str(self),
        }
    }
}

impl<'de> Deserialize<'de> for Replicas {
    /// `3`, `3.0` (JSON has only numbers), `"3"` or `"2..6"`.
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Replicas;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("replicas as N or \"MIN..MAX\"")
            }
            fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<Replicas, E> {
                let min = u32::try_from(n)
                    .map_err(|_| E::custom(format!("bad replicas {n}: give 1 to 64")))?;
                Ok(Replicas { min, max: None })
            }
            fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<Replicas, E> {
                let n = u64::try_from(n)
                    .map_err(|_| E::custom(format!("bad replicas {n}: give N or MIN..MAX")))?;
                self.visit_u64(n)
            }
            fn visit_f64<E: serde::de::Error>(self, n: f64) -> Result<Replicas, E> {
                if n.fract() != 0.0 || !(0.0..=f64::from(u32::MAX)).contains(&n) {
                    return Err(E::custom(format!("bad replicas {n}: give N or MIN..MAX")));
                }
                self.visit_u64(n as u64)
            }
            fn visit_str<E: serde::de::Error>(self, raw: &str) -> Result<Replicas, E> {
                let (min, max) = crate::parse_replicas(raw).map_err(E::custom)?;
                Ok(Replicas { min, max })
            }
        }
        d.deserialize_any(Visitor)
    }
}

#[cfg(feature = "openapi")]
fn replicas_schema() -> utoipa::openapi::schema::Schema {
    use utoipa::openapi::schema::{ObjectBuilder, OneOfBuilder, Schema, SchemaType, Type};
    Schema::OneOf(
        OneOfBuilder::new()
            .item(
                ObjectBuilder::new()
                    .schema_type(SchemaType::from_iter([Type::Integer]))
                    .minimum(Some(1))
                    .maximum(Some(64)),
            )
            .item(
                ObjectBuilder::new()
                    .schema_type(SchemaType::from_iter([Type::String]))
                    // 1 to 64 each (a minimum above the maximum is the
                    // service rules' to refuse, with a 422).
                    .pattern(Some(
                        r"^([1-9]|[1-5][0-9]|6[0-4])(\.\.([1-9]|[1-5][0-9]|6[0-4]))?$",
                    ))
                    .examples(["2..6"]),
            )
            .default(Some(serde_json::json!(1)))
            .build(),
    )
}

/// The body of `POST /v1/rooms/apply`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ApplyRoomRequest {
    pub room: RoomFile,
    /// Only say what would change.
    #[serde(default)]
    pub dry_run: bool,
}

/// What a change does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum ChangeOp {
    Add,
    Change,
    Remove,
}

impl ChangeOp {
    pub fn sign(self) -> char {
        match self {
            ChangeOp::Add => '+',
            ChangeOp::Change => '~',
            ChangeOp::Remove => '-',
        }
    }
}

/// One change `room apply` makes (or would make).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RoomChange {
    pub op: ChangeOp,
    /// What it is about: `room acme`, `instance web1`, `expose tcp/8080`...
    pub what: String,
    /// The detail: `web (dmz)`, `-> web1:80`, `config port=8080`...
    pub detail: String,
}

/// What `room apply` changed (or, with `dry_run`, would change).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RoomPlan {
    pub room: Name,
    pub changes: Vec<RoomChange>,
    pub applied: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `[[services]]` entries: replicas as a number or a range, targets
    /// by field, and what is refused naming the field.
    #[test]
    fn room_services_table() {
        let acme: Name = "acme".parse().unwrap();
        let ok = [
            (r#"{"name":"shop","image":"web"}"#, (1, None, 80, None)),
            (
                r#"{"name":"shop","image":"web","replicas":3.0,"port":8080}"#,
                (3, None, 8080, None),
            ),
            (
                r#"{"name":"shop","image":"web","replicas":"2..6","slo":"p95<50ms"}"#,
                (2, Some(6), 80, Some(ScaleTarget::P95Ms(50))),
            ),
            (
                r#"{"name":"shop","image":"web","replicas":"1..3","target_cpu":"60%","cold":true}"#,
                (1, Some(3), 80, Some(ScaleTarget::CpuPercent(60))),
            ),
        ];
        for (body, (min, max, port, target)) in ok {
            let entry: RoomService = serde_json::from_str(body).unwrap();
            let def = entry.definition(&acme).unwrap();
            assert_eq!(
                (def.replicas, def.max_replicas, def.port, def.scale_on),
                (min, max, port, target),
                "{body}"
            );
            assert_eq!(def.room.as_ref(), Some(&acme));
            assert_eq!(def.warm, !body.contains("cold"), "{body}");
            // What the CLI sends is what it read.
            let again: RoomService =
                serde_json::from_str(&serde_json::to_string(&entry).unwrap()).unwrap();
            assert_eq!(again, entry, "{body}");
        }
        for (body, says) in [
            (
                r#"{"name":"shop","image":"web","replicas":"x"}"#,
                "bad replicas",
            ),
            (
                r#"{"name":"shop","image":"web","replicas":"2.."}"#,
                "bad replicas",
            ),
            (
                r#"{"name":"shop","image":"web","replicas":-1}"#,
                "bad replicas",
            ),
            (
                r#"{"name":"shop","image":"web","replicas":1.5}"#,
                "bad replicas",
            ),
            (r#"{"name":"shop","image":"web","colour":"red"}"#, "colour"),
        ] {
            let err = serde_json::from_str::<RoomService>(body).unwrap_err();
            assert!(err.to_string().contains(says), "{body}: {err}");
        }
        for (body, says) in [
            (
                r#"{"name":"shop","image":"web","slo":"fast"}"#,
                "slo: bad target",
            ),
            (
                r#"{"name":"shop","image":"web","slo":"60%"}"#,
                "slo: takes a latency",
            ),
            (
                r#"{"name":"shop","image":"web","target_cpu":"p95<5ms"}"#,
                "target_cpu: takes",
            ),
            (
                r#"{"name":"shop","image":"web","slo":"p95<5ms","target_cpu":"60%"}"#,
                "not both",
            ),
        ] {
            let entry: RoomService = serde_json::from_str(body).unwrap();
            let err = entry.definition(&acme).unwrap_err();
            assert!(err.contains(says), "{body}: {err}");
        }
    }

    /// Subnets are named by role; a sequence in their place is refused
    /// (serde alone would read `[null, null]` as no subnets).
    #[test]
    fn room_networks_are_a_map_only() {
        for (body, ok) in [
            (r#"{"name":"a","networks":{"lan":"10.9.1.0/24"}}"#, true),
            (r#"{"name":"a","networks":{}}"#, true),
            (r#"{"name":"a"}"#, true),
            (r#"{"name":"a","networks":[null,null]}"#, false),
            (r#"{"name":"a","networks":["10.9.1.0/24"]}"#, false),
            (r#"{"name":"a","networks":null}"#, false),
        ] {
            assert_eq!(serde_json::from_str::<RoomSpec>(body).is_ok(), ok, "{body}");
            let file = body.replace(r#"{"name":"a""#, r#"{"name":"a","instances":{}"#);
            assert_eq!(
                serde_json::from_str::<RoomFile>(&file).is_ok(),
                ok,
                "{file}"
            );
        }
        let lan =
            serde_json::from_str::<RoomSpec>(r#"{"name":"a","networks":{"lan":"10.9.1.0/24"}}"#);
        assert_eq!(
            lan.unwrap().networks.lan,
            Some("10.9.1.0/24".parse().unwrap())
        );
    }

    #[test]
    fn room_files_refuse_unknown_fields_and_read_segments() {
        let file: RoomFile = toml_like(
            r#"{"name":"acme","instances":{"web1":{"image":"web","segment":"dmz","config":{"port":"80"}}},
                "expose":[{"port":8080,"to":"web1","to_port":80}]}"#,
        )
        .unwrap();
        assert_eq!(
            file.instances[&Name::new("web1").unwrap()].segment,
            Segment::Dmz
        );
        assert_eq!(file.expose[0].proto, Protocol::Tcp);
        assert!(toml_like(r#"{"name":"acme","extra":1}"#).is_err());
        assert!(
            toml_like(r#"{"name":"acme","instances":{"w":{"image":"web","segment":"wan"}}}"#)
                .is_err()
        );
    }

    fn toml_like(json: &str) -> Result<RoomFile, serde_json::Error> {
        serde_json::from_str(json)
    }

    #[test]
    fn long_room_names_are_refused() {
        assert!(check_room_name(&Name::new(&"a".repeat(28)).unwrap()).is_ok());
        assert!(check_room_name(&Name::new(&"a".repeat(29)).unwrap()).is_err());
    }
}
