//! Where a push target may point: the one policy the server applies when a
//! device sets a target (SetPushTarget) and the push worker applies again to
//! every target it reads back from the events topic and to every address a
//! target's host name resolves to, so that no account can make the worker
//! POST into the operator's own network (SSRF, DNS rebinding included).
//!
//! Refused: loopback, private (RFC 1918, IPv6 unique local), link-local,
//! shared address space (CGNAT), multicast, unspecified, broadcast,
//! documentation and benchmarking ranges, the other special-purpose blocks no
//! push service lives in, and every IPv6 form that embeds an IPv4 address
//! (mapped, compatible, 6to4, NAT64) of a refused one. Networks on the
//! policy's allow-list are exempt: a setting made for tests and for push
//! gateways run inside the operator's network on purpose.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::LazyLock,
};

use ipnet::IpNet;
use url::{Host, Url};

use crate::PushTarget;

/// Longest endpoint / webhook URL.
pub const MAX_URL_CHARS: usize = 1024;
pub const MAX_APP_ID_CHARS: usize = 64;
pub const MAX_PUSHKEY_CHARS: usize = 512;
/// An uncompressed P-256 point.
pub const P256DH_BYTES: usize = 65;
pub const AUTH_BYTES: usize = 16;
/// The path every Matrix push gateway serves.
pub const MATRIX_NOTIFY_PATH: &str = "/_matrix/push/v1/notify";

/// Refused IPv4 blocks (IANA special-purpose registry), most specific first.
const REFUSED_V4: &[(&str, &str)] = &[
    ("255.255.255.255/32", "broadcast"),
    ("0.0.0.0/8", "unspecified (\"this network\")"),
    ("10.0.0.0/8", "private (RFC 1918)"),
    ("100.64.0.0/10", "shared address space (CGNAT)"),
    ("127.0.0.0/8", "loopback"),
    ("169.254.0.0/16", "link-local"),
    ("172.16.0.0/12", "private (RFC 1918)"),
    ("192.0.0.0/24", "IETF protocol assignments"),
    ("192.0.2.0/24", "documentation"),
    ("192.88.99.0/24", "6to4 relay anycast"),
    ("192.168.0.0/16", "private (RFC 1918)"),
    ("198.18.0.0/15", "benchmarking"),
    ("198.51.100.0/24", "documentation"),
    ("203.0.113.0/24", "documentation"),
    ("224.0.0.0/4", "multicast"),
    ("240.0.0.0/4", "reserved"),
];

/// Refused IPv6 blocks; anything outside global unicast (2000::/3) is refused too.
const REFUSED_V6: &[(&str, &str)] = &[
    ("::/128", "unspecified"),
    ("::1/128", "loopback"),
    ("fc00::/7", "unique local (private)"),
    ("fe80::/10", "link-local"),
    ("fec0::/10", "site-local"),
    ("ff00::/8", "multicast"),
    ("2001::/23", "IETF protocol assignments (Teredo, benchmarking, ORCHID)"),
    ("2001:db8::/32", "documentation"),
    ("2002::/16", "6to4 (embeds an IPv4 address)"),
    ("3fff::/20", "documentation"),
];

/// Networks with the name of their range.
type RangeTable = Vec<(IpNet, &'static str)>;

fn table(entries: &[(&str, &'static str)]) -> RangeTable {
    entries.iter().map(|(net, name)| (net.parse().expect("a valid network literal"), *name)).collect()
}

static REFUSED: LazyLock<(RangeTable, RangeTable)> = LazyLock::new(|| (table(REFUSED_V4), table(REFUSED_V6)));

/// The well-known NAT64 prefix: its addresses stand for the IPv4 address in their last 32 bits.
const NAT64: Ipv6Addr = Ipv6Addr::new(0x64, 0xff9b, 0, 0, 0, 0, 0, 0);

/// Why `ip` may not be a push destination (the name of its range), or `None` for a
/// public unicast address.
pub fn refused_range(ip: IpAddr) -> Option<&'static str> {
    let (v4, v6) = &*REFUSED;
    match ip.to_canonical() {
        IpAddr::V4(ip) => v4.iter().find(|(net, _)| net.contains(&IpAddr::V4(ip))).map(|(_, name)| *name),
        IpAddr::V6(ip) => {
            let segments = ip.segments();
            if segments[..6] == NAT64.segments()[..6] {
                let [.., high, low] = segments;
                let embedded = Ipv4Addr::from((u32::from(high) << 16) | u32::from(low));
                return refused_range(IpAddr::V4(embedded)).map(|_| "NAT64 form of a refused IPv4 address");
            }
            if let Some((_, name)) = v6.iter().find(|(net, _)| net.contains(&IpAddr::V6(ip))) {
                return Some(name);
            }
            // 2000::/3: the only block of global unicast addresses.
            (segments[0] & 0xe000 != 0x2000).then_some("not global unicast (IPv4-compatible, reserved, …)")
        }
    }
}

/// The address policy: refused ranges, minus the networks on the allow-list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TargetPolicy {
    allowed: Vec<IpNet>,
}

impl TargetPolicy {
    /// Refuses every range in [`refused_range`]; the default.
    pub fn public_only() -> Self {
        Self::default()
    }

    /// Exempts `allowed` networks (`127.0.0.1`, `127.0.0.0/8`, `fd00::/8`, …) from the refusal.
    pub fn allowing(allowed: &[String]) -> Result<Self, String> {
        let parse = |text: &String| {
            let text = text.trim();
            text.parse::<IpNet>()
                .or_else(|_| text.parse::<IpAddr>().map(IpNet::from))
                .map_err(|_| format!("{text:?} is not an IP address or network (a.b.c.d/n, x::y/n)"))
        };
        Ok(Self { allowed: allowed.iter().map(parse).collect::<Result<_, _>>()? })
    }

    /// Whether the policy exempts anything (a test or in-network setup).
    pub fn allows_private(&self) -> bool {
        !self.allowed.is_empty()
    }

    /// `Err` names the refused range `ip` is in.
    pub fn check_ip(&self, ip: IpAddr) -> Result<(), &'static str> {
        let Some(range) = refused_range(ip) else { return Ok(()) };
        let exempt = |ip: IpAddr| self.allowed.iter().any(|net| net.contains(&ip));
        if exempt(ip) || exempt(ip.to_canonical()) { Ok(()) } else { Err(range) }
    }

    pub fn permits(&self, ip: IpAddr) -> bool {
        self.check_ip(ip).is_ok()
    }

    /// Checks a URL the push worker would POST to: absolute, `https` (plain `http` only
    /// for a loopback host the policy allows, for local push services), a host that is a
    /// permitted address or a name other than `localhost`, no credentials, no fragment,
    /// at most [`MAX_URL_CHARS`]. The URL is read as the worker's HTTP client reads it
    /// (WHATWG: `http://2130706433/` is 127.0.0.1). Names are resolved only by the worker,
    /// which drops every refused address a name resolves to.
    pub fn check_url(&self, field: &str, url: &str) -> Result<Url, String> {
        let invalid = |why: &str| Err(format!("{field} {why}"));
        if url.is_empty() {
            return invalid("is missing");
        }
        if url.chars().count() > MAX_URL_CHARS {
            return invalid(&format!("is longer than {MAX_URL_CHARS} characters"));
        }
        if url.chars().any(|c| c.is_control() || c.is_whitespace()) || url.contains('#') {
            return invalid("contains whitespace, control characters or a fragment");
        }
        let parsed = match Url::parse(url) {
            Ok(parsed) => parsed,
            Err(url::ParseError::RelativeUrlWithoutBase) => return invalid("is not an absolute URL (https://host/…)"),
            Err(_) => return invalid("is not a URL"),
        };
        if !matches!(parsed.scheme(), "https" | "http") {
            return invalid("must be an https URL");
        }
        if !parsed.username().is_empty() || parsed.password().is_some() {
            return invalid("must not contain credentials");
        }
        let loopback = match parsed.host() {
            None => return invalid("has no host"),
            Some(Host::Domain(name)) => {
                let name = name.trim_end_matches('.');
                if name.is_empty() {
                    return invalid("has no host");
                }
                // RFC 6761: these names are the loopback interface, whatever DNS says.
                let loopback = name == "localhost" || name.ends_with(".localhost");
                if loopback && let Err(range) = self.check_ip(IpAddr::V4(Ipv4Addr::LOCALHOST)) {
                    return invalid(&format!("names a {range} host, which push targets may not reach"));
                }
                loopback
            }
            Some(Host::Ipv4(ip)) => self.check_literal(field, IpAddr::V4(ip))?,
            Some(Host::Ipv6(ip)) => self.check_literal(field, IpAddr::V6(ip))?,
        };
        if parsed.scheme() == "http" && !loopback {
            return invalid("must use https (plain http only for a loopback host)");
        }
        Ok(parsed)
    }

    /// `Ok(loopback)` for a permitted address.
    fn check_literal(&self, field: &str, ip: IpAddr) -> Result<bool, String> {
        match self.check_ip(ip) {
            Ok(()) => Ok(ip.to_canonical().is_loopback()),
            Err(range) => Err(format!("{field} names a {range} address, which push targets may not reach")),
        }
    }

    /// Validates a whole target (as a device sent it, or as read back from the events
    /// topic); returns the URL the worker POSTs to.
    pub fn check_target(&self, target: &PushTarget) -> Result<Url, String> {
        match target {
            PushTarget::WebPush { endpoint, p256dh, auth } => {
                let url = self.check_url("web_push.endpoint", endpoint)?;
                if p256dh.len() != P256DH_BYTES || p256dh[0] != 0x04 {
                    return Err(format!(
                        "web_push.p256dh must be an uncompressed P-256 public key: {P256DH_BYTES} bytes starting \
                         with 0x04 (got {} bytes)",
                        p256dh.len()
                    ));
                }
                if auth.len() != AUTH_BYTES {
                    return Err(format!("web_push.auth must be {AUTH_BYTES} bytes (got {})", auth.len()));
                }
                Ok(url)
            }
            PushTarget::Webhook { url, app_id, pushkey } => {
                let parsed = self.check_url("webhook.url", url)?;
                if !parsed.path().ends_with(MATRIX_NOTIFY_PATH) || parsed.query().is_some() {
                    return Err(format!(
                        "webhook.url must be a Matrix push gateway URL ending in {MATRIX_NOTIFY_PATH}, without a query"
                    ));
                }
                check_text("webhook.app_id", app_id, MAX_APP_ID_CHARS)?;
                check_text("webhook.pushkey", pushkey, MAX_PUSHKEY_CHARS)?;
                Ok(parsed)
            }
        }
    }
}

fn check_text(field: &str, value: &str, max: usize) -> Result<(), String> {
    if value.is_empty() {
        return Err(format!("{field} is missing"));
    }
    if value.chars().count() > max {
        return Err(format!("{field} is longer than {max} characters"));
    }
    if value.chars().any(char::is_control) {
        return Err(format!("{field} contains control characters"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn web_push(endpoint: &str) -> PushTarget {
        let mut p256dh = vec![4u8; P256DH_BYTES];
        p256dh[0] = 0x04;
        PushTarget::WebPush { endpoint: endpoint.into(), p256dh, auth: vec![1; AUTH_BYTES] }
    }

    #[test]
    fn internal_addresses_are_refused_in_every_spelling() {
        let refused = [
            "127.0.0.1",
            "127.255.0.9",
            "10.0.0.1",
            "172.16.5.4",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "100.127.255.254",
            "0.0.0.0",
            "255.255.255.255",
            "224.0.0.251",
            "239.255.255.250",
            "192.0.2.10",
            "198.51.100.1",
            "203.0.113.7",
            "198.18.0.1",
            "240.0.0.1",
            "::",
            "::1",
            "fc00::1",
            "fd12:3456::1",
            "fe80::1",
            "ff02::1",
            "2001:db8::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "::ffff:169.254.169.254",
            "::127.0.0.1",
            "64:ff9b::a9fe:a9fe",
            "2002:7f00:1::1",
            "2001:0:4136:e378::1",
        ];
        for text in refused {
            let ip: IpAddr = text.parse().unwrap();
            assert!(refused_range(ip).is_some(), "{text} must be refused");
            assert!(!TargetPolicy::public_only().permits(ip), "{text}");
        }
        for text in ["1.1.1.1", "172.15.255.255", "172.32.0.1", "100.128.0.1", "2606:4700::1111", "64:ff9b::808:808"] {
            assert_eq!(refused_range(text.parse().unwrap()), None, "{text} is public");
        }
    }

    #[test]
    fn urls_naming_internal_hosts_are_refused_and_the_allow_list_exempts() {
        let policy = TargetPolicy::public_only();
        for url in [
            "http://127.0.0.1:8080/push",
            "https://127.0.0.1/push",
            "https://10.0.0.1/push",
            "https://169.254.169.254/latest/meta-data",
            "http://[::1]:8080/push",
            "https://[::ffff:7f00:1]/push",
            "https://2130706433/push",
            "https://0x7f.1/push",
            "https://0/push",
            "https://localhost/push",
            "https://LOCALHOST./push",
            "https://push.localhost/push",
        ] {
            let error = policy.check_target(&web_push(url)).expect_err(url);
            assert!(error.contains("may not reach"), "{url}: {error}");
        }
        policy.check_target(&web_push("https://updates.push.services.mozilla.com/wpush/v2/x")).unwrap();
        policy.check_target(&web_push("https://1.1.1.1/x")).unwrap();

        let tests = TargetPolicy::allowing(&["127.0.0.1".into(), "::1/128".into()]).unwrap();
        tests.check_target(&web_push("http://127.0.0.1:8080/push")).unwrap();
        tests.check_target(&web_push("http://[::1]:8080/push")).unwrap();
        tests.check_target(&web_push("http://localhost:8080/push")).unwrap();
        assert!(tests.check_target(&web_push("http://127.0.0.2:8080/push")).is_err(), "only what is listed");
        assert!(tests.check_target(&web_push("https://10.0.0.1/push")).is_err());
        assert!(tests.permits("::ffff:127.0.0.1".parse().unwrap()), "the mapped form of a listed address");
        assert!(TargetPolicy::allowing(&["not-an-ip".into()]).is_err());
    }
}
