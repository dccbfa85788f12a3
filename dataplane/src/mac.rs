//! The Ethernet (MAC) address type shared by the model, the parser and the pipeline.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A 48-bit Ethernet address.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// The broadcast address ff:ff:ff:ff:ff:ff.
    pub const BROADCAST: MacAddr = MacAddr([0xff; 6]);
    /// The all-zero address.
    pub const ZERO: MacAddr = MacAddr([0; 6]);

    /// Whether the group (multicast) bit is set; broadcast is a group address too.
    pub fn is_multicast(&self) -> bool {
        self.0[0] & 1 == 1
    }

    /// The IPv6 multicast MAC (33:33:xx:xx:xx:xx) for a multicast IPv6 address.
    pub fn ipv6_multicast(ip: &std::net::Ipv6Addr) -> MacAddr {
        let o = ip.octets();
        MacAddr([0x33, 0x33, o[12], o[13], o[14], o[15]])
    }

    /// The EUI-64 link-local IPv6 address (fe80::/64) that SLAAC derives from this MAC.
    pub fn link_local_v6(&self) -> std::net::Ipv6Addr {
        let m = self.0;
        std::net::Ipv6Addr::from([
            0xfe, 0x80, 0, 0, 0, 0, 0, 0, m[0] ^ 2, m[1], m[2], 0xff, 0xfe, m[3], m[4], m[5],
        ])
    }

    /// The EUI-64 address SLAAC derives from this MAC inside a /64 prefix.
    pub fn eui64_in(&self, prefix: &std::net::Ipv6Addr) -> std::net::Ipv6Addr {
        let mut o = prefix.octets();
        let ll = self.link_local_v6().octets();
        o[8..].copy_from_slice(&ll[8..]);
        std::net::Ipv6Addr::from(o)
    }
}

/// The text was not six colon-separated hexadecimal octets.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("Bad MAC address '{0}': expected six hexadecimal octets such as fa:16:3e:00:00:01")]
pub struct MacParseError(pub String);

impl FromStr for MacAddr {
    type Err = MacParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut out = [0u8; 6];
        let mut n = 0;
        for part in s.split([':', '-']) {
            if n == 6 || part.len() != 2 {
                return Err(MacParseError(s.to_string()));
            }
            out[n] = u8::from_str_radix(part, 16).map_err(|_| MacParseError(s.to_string()))?;
            n += 1;
        }
        if n != 6 {
            return Err(MacParseError(s.to_string()));
        }
        Ok(MacAddr(out))
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(f, "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", m[0], m[1], m[2], m[3], m[4], m[5])
    }
}

impl fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl Serialize for MacAddr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints() {
        let m: MacAddr = "fa:16:3e:0a:0B:ff".parse().unwrap();
        assert_eq!(m.to_string(), "fa:16:3e:0a:0b:ff");
        assert!("fa:16:3e:0a:0b".parse::<MacAddr>().is_err());
        assert!("fa:16:3e:0a:0b:ff:00".parse::<MacAddr>().is_err());
        assert!("zz:16:3e:0a:0b:ff".parse::<MacAddr>().is_err());
        assert!(MacAddr::BROADCAST.is_multicast());
    }

    #[test]
    fn link_local_is_eui64() {
        let m: MacAddr = "52:54:00:12:34:56".parse().unwrap();
        assert_eq!(m.link_local_v6().to_string(), "fe80::5054:ff:fe12:3456");
    }
}
