//! Service VIPs: one stable loopback address per service name (and per
//! tag-filtered name), from `proxy.vip_range`.
//!
//! DNS answers a service's name with its VIP and the proxy listens on it,
//! so a VIP must never change while clients may have it cached: the first
//! choice is a hash of the name (so most hosts agree without talking), the
//! next free address after it on a collision, and the agent keeps the table
//! on disk so a restart changes nothing.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// An IPv4 block inside 127.0.0.0/8 that VIPs are taken from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VipRange {
    network: u32,
    prefix: u8,
}

impl VipRange {
    /// How many VIPs the range holds (its network and broadcast addresses
    /// are never handed out).
    pub fn capacity(&self) -> u32 {
        (1u32 << (32 - self.prefix)) - 2
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == self.network
    }

    /// Inside the range and neither its network nor broadcast address.
    fn usable(&self, ip: Ipv4Addr) -> bool {
        let ip = u32::from(ip);
        self.contains(ip.into()) && ip != self.network && ip != self.network | !self.mask()
    }

    fn mask(&self) -> u32 {
        u32::MAX << (32 - self.prefix)
    }

    /// The `n`-th usable address (`n < capacity`).
    fn nth(&self, n: u32) -> Ipv4Addr {
        Ipv4Addr::from(self.network + 1 + n)
    }
}

impl Default for VipRange {
    fn default() -> Self {
        VipRange {
            network: u32::from(Ipv4Addr::new(127, 77, 0, 0)),
            prefix: 16,
        }
    }
}

impl fmt::Display for VipRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", Ipv4Addr::from(self.network), self.prefix)
    }
}

impl FromStr for VipRange {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (ip, prefix) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?} must be an IPv4 block such as 127.77.0.0/16"))?;
        let ip: Ipv4Addr = ip
            .parse()
            .map_err(|_| format!("{ip:?} is not an IPv4 address"))?;
        let prefix: u8 = prefix
            .parse()
            .ok()
            .filter(|p| (8..=30).contains(p))
            .ok_or_else(|| format!("prefix length {prefix:?} must be between 8 and 30"))?;
        let range = VipRange {
            network: u32::from(ip),
            prefix,
        };
        if range.network & range.mask() != range.network {
            return Err(format!(
                "{s} has host bits set; did you mean {}/{prefix}?",
                Ipv4Addr::from(range.network & range.mask())
            ));
        }
        if ip.octets()[0] != 127 {
            return Err(format!(
                "{s} is not inside 127.0.0.0/8: VIPs must be loopback addresses the proxy can bind without configuring an interface"
            ));
        }
        Ok(range)
    }
}

impl Serialize for VipRange {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for VipRange {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// The key of a VIP: the service name, or `<tag>.<service>` for the name
/// filtered by a tag (the DNS name's own prefix).
pub fn vip_key(service: &str, tag: Option<&str>) -> String {
    match tag {
        Some(tag) => format!("{tag}.{service}"),
        None => service.to_string(),
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VipError {
    #[error("every address of the VIP range {0} is taken; widen proxy.vip_range")]
    Exhausted(VipRange),
}

/// Which VIP belongs to which key, both ways.
#[derive(Debug, Clone, Default)]
pub struct VipTable {
    range: VipRange,
    by_key: BTreeMap<String, Ipv4Addr>,
    by_ip: HashMap<Ipv4Addr, String>,
}

impl VipTable {
    pub fn new(range: VipRange) -> Self {
        VipTable {
            range,
            by_key: BTreeMap::new(),
            by_ip: HashMap::new(),
        }
    }

    /// A table with the given assignments. Those outside `range` (the range
    /// was changed) or claiming an address already taken are left out and
    /// returned, so the caller can say so.
    pub fn with_entries(
        range: VipRange,
        entries: impl IntoIterator<Item = (String, Ipv4Addr)>,
    ) -> (Self, Vec<String>) {
        let mut table = VipTable::new(range);
        let mut dropped = Vec::new();
        for (key, ip) in entries {
            if !range.usable(ip) || table.by_ip.contains_key(&ip) {
                dropped.push(key);
                continue;
            }
            table.insert(key, ip);
        }
        (table, dropped)
    }

    pub fn range(&self) -> VipRange {
        self.range
    }

    pub fn get(&self, key: &str) -> Option<Ipv4Addr> {
        self.by_key.get(key).copied()
    }

    /// The key a VIP belongs to.
    pub fn owner(&self, ip: Ipv4Addr) -> Option<&str> {
        self.by_ip.get(&ip).map(String::as_str)
    }

    pub fn entries(&self) -> &BTreeMap<String, Ipv4Addr> {
        &self.by_key
    }

    /// The VIP of `key`, allocating one if it has none; the flag says
    /// whether it is new (and the table must be saved).
    pub fn allocate(&mut self, key: &str) -> Result<(Ipv4Addr, bool), VipError> {
        if let Some(ip) = self.get(key) {
            return Ok((ip, false));
        }
        let capacity = self.range.capacity();
        let start = fnv1a(key.as_bytes()) % capacity;
        for step in 0..capacity {
            let ip = self.range.nth((start + step) % capacity);
            if !self.by_ip.contains_key(&ip) {
                self.insert(key.to_string(), ip);
                return Ok((ip, true));
            }
        }
        Err(VipError::Exhausted(self.range))
    }

    fn insert(&mut self, key: String, ip: Ipv4Addr) {
        self.by_ip.insert(ip, key.clone());
        self.by_key.insert(key, ip);
    }
}

/// 32-bit FNV-1a: a hash that is the same on every host and every release
/// (std's hasher promises neither).
fn fnv1a(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c_9dc5, |hash, b| {
        (hash ^ u32::from(*b)).wrapping_mul(0x0100_0193)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_parse_and_refuse_what_cannot_work() {
        let r: VipRange = "127.77.0.0/16".parse().unwrap();
        assert_eq!(r, VipRange::default());
        assert_eq!(r.capacity(), 65534);
        assert!(r.contains(Ipv4Addr::new(127, 77, 3, 4)));
        assert!(!r.contains(Ipv4Addr::new(127, 78, 0, 1)));
        assert!(
            "10.0.0.0/8"
                .parse::<VipRange>()
                .unwrap_err()
                .contains("127.0.0.0/8")
        );
        assert!(
            "127.77.0.1/16"
                .parse::<VipRange>()
                .unwrap_err()
                .contains("127.77.0.0/16")
        );
        assert!("127.77.0.0/31".parse::<VipRange>().is_err());
        assert!("127.77.0.0".parse::<VipRange>().is_err());
    }

    #[test]
    fn allocation_is_stable_and_never_hands_out_an_address_twice() {
        let range: VipRange = "127.77.0.0/30".parse().unwrap();
        let mut t = VipTable::new(range);
        let (a, new) = t.allocate("web").unwrap();
        assert!(new);
        assert_eq!(t.allocate("web").unwrap(), (a, false));
        let (b, _) = t.allocate("db").unwrap();
        assert_ne!(a, b);
        assert!(range.contains(a) && range.contains(b));
        // Network and broadcast addresses are never used.
        for ip in [a, b] {
            assert_ne!(ip, Ipv4Addr::new(127, 77, 0, 0));
            assert_ne!(ip, Ipv4Addr::new(127, 77, 0, 3));
        }
        assert_eq!(t.allocate("third"), Err(VipError::Exhausted(range)));
        assert_eq!(t.owner(b), Some("db"));

        // The same name gets the same first choice in another table (host).
        let mut other = VipTable::new(range);
        assert_eq!(other.allocate("web").unwrap().0, a);
    }

    #[test]
    fn restored_entries_outside_the_range_or_doubled_are_dropped() {
        let range: VipRange = "127.77.0.0/24".parse().unwrap();
        let (t, dropped) = VipTable::with_entries(
            range,
            [
                ("a".to_string(), Ipv4Addr::new(127, 77, 0, 9)),
                ("b".to_string(), Ipv4Addr::new(127, 77, 0, 9)),
                ("c".to_string(), Ipv4Addr::new(127, 78, 0, 9)),
            ],
        );
        assert_eq!(t.get("a"), Some(Ipv4Addr::new(127, 77, 0, 9)));
        assert_eq!(dropped, vec!["b".to_string(), "c".to_string()]);
    }
}
