//! DNS for the push worker's HTTP client: every address a target's host name
//! resolves to is checked against the target policy, and refused ones are
//! dropped before the client sees them. The client connects only to what is
//! left, with no second lookup, so a name that answers a public address once
//! and an internal one the next time (DNS rebinding) never reaches the
//! internal one. Address literals never come here (the client connects to them
//! directly): `TargetPolicy::check_url` refuses those before each request.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use lockstep_schemas::target_policy::TargetPolicy;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};

/// Where names are looked up.
#[derive(Debug, Clone)]
pub enum Lookup {
    /// The system's resolver (`getaddrinfo`).
    System,
    /// A fixed table, for tests (a name that resolves to a private address without DNS).
    Table(Arc<HashMap<String, Vec<IpAddr>>>),
}

/// Names with no permitted address, or none at all.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("every address of this name is refused for push targets ({refused} refused)")]
    Refused { refused: usize },
    #[error("the name has no address")]
    NoAddress,
    #[error("cannot resolve: {0}")]
    Lookup(#[from] std::io::Error),
}

#[derive(Debug, Clone)]
pub struct FilteringResolver {
    policy: Arc<TargetPolicy>,
    lookup: Lookup,
}

impl FilteringResolver {
    pub fn new(policy: Arc<TargetPolicy>, lookup: Lookup) -> Self {
        Self { policy, lookup }
    }

    /// The permitted addresses of `name` (port 0: the client sets the URL's port).
    pub async fn permitted(&self, name: &str) -> Result<Vec<SocketAddr>, ResolveError> {
        let resolved: Vec<SocketAddr> = match &self.lookup {
            Lookup::System => tokio::net::lookup_host((name, 0)).await?.collect(),
            Lookup::Table(table) => table.get(name).into_iter().flatten().map(|ip| SocketAddr::new(*ip, 0)).collect(),
        };
        if resolved.is_empty() {
            return Err(ResolveError::NoAddress);
        }
        let total = resolved.len();
        let permitted: Vec<SocketAddr> = resolved.into_iter().filter(|addr| self.policy.permits(addr.ip())).collect();
        let refused = total - permitted.len();
        if refused > 0 {
            // The name is a target's host, which may be as secret as the endpoint: not logged.
            metrics::counter!("lockstep_push_refused_addresses_total").increment(refused as u64);
            tracing::warn!(
                refused,
                permitted = permitted.len(),
                "dropped refused addresses from a push host's DNS answer"
            );
        }
        if permitted.is_empty() {
            return Err(ResolveError::Refused { refused });
        }
        Ok(permitted)
    }
}

impl Resolve for FilteringResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let resolver = self.clone();
        Box::pin(async move {
            let permitted = resolver.permitted(name.as_str()).await?;
            Ok(Box::new(permitted.into_iter()) as Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(entries: &[(&str, &[&str])]) -> Lookup {
        let table = entries
            .iter()
            .map(|(name, ips)| (name.to_string(), ips.iter().map(|ip| ip.parse().unwrap()).collect()))
            .collect();
        Lookup::Table(Arc::new(table))
    }

    #[tokio::test]
    async fn refused_addresses_are_dropped_from_every_answer() {
        let lookup = table(&[
            ("internal.test", &["10.0.0.1", "127.0.0.1", "::1", "169.254.169.254"]),
            ("mixed.test", &["192.168.1.1", "1.1.1.1", "fd00::1", "2606:4700::1111"]),
            ("mapped.test", &["::ffff:10.0.0.1"]),
        ]);
        let resolver = FilteringResolver::new(Arc::new(TargetPolicy::public_only()), lookup.clone());
        assert!(matches!(resolver.permitted("internal.test").await, Err(ResolveError::Refused { refused: 4 })));
        assert!(matches!(resolver.permitted("mapped.test").await, Err(ResolveError::Refused { refused: 1 })));
        assert!(matches!(resolver.permitted("unknown.test").await, Err(ResolveError::NoAddress)));
        let kept: Vec<IpAddr> = resolver.permitted("mixed.test").await.unwrap().iter().map(|a| a.ip()).collect();
        assert_eq!(kept, ["1.1.1.1".parse::<IpAddr>().unwrap(), "2606:4700::1111".parse().unwrap()]);

        let tests = TargetPolicy::allowing(&["127.0.0.1".into()]).unwrap();
        let resolver = FilteringResolver::new(Arc::new(tests), lookup);
        let kept: Vec<IpAddr> = resolver.permitted("internal.test").await.unwrap().iter().map(|a| a.ip()).collect();
        assert_eq!(kept, ["127.0.0.1".parse::<IpAddr>().unwrap()], "only the listed address");
    }

    #[tokio::test]
    async fn localhost_through_the_system_resolver_is_refused() {
        let resolver = FilteringResolver::new(Arc::new(TargetPolicy::public_only()), Lookup::System);
        assert!(matches!(resolver.permitted("localhost").await, Err(ResolveError::Refused { .. })));
    }
}
