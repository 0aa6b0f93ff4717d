//! Who a request comes from, as far as the caches are concerned. A cache hit is visible to the
//! caller (`cached_tokens`, time to first token), so blocks are shared only between requests
//! that may learn about each other: the same API key under `per_key` isolation, and the same
//! `cache_salt` request field (vLLM's) in either mode. Compiled grammars are shared by API key
//! alone (the salt with no `cache_salt`).

use xxhash_rust::xxh3::xxh3_64_with_seed;

use crate::config::PrefixCacheIsolation;

/// The authenticated caller: a hash of the API key it presented (the key itself is not kept in
/// request extensions). Set by the auth middleware; absent when authentication is off.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Tenant(u64);

/// Seeds the salt hashes; any fixed value works, the salts only need to differ per tenant.
const SALT_SEED: u64 = 0x6361_6475_6365_7573;

impl Tenant {
    /// The tenant holding `api_key`.
    pub fn from_api_key(api_key: &str) -> Tenant {
        Tenant(xxh3_64_with_seed(api_key.as_bytes(), SALT_SEED))
    }
}

/// The scheduler's cache salt for one request: `None` (the shared, unsalted cache) only when
/// neither the tenant (under `per_key`) nor the request's `cache_salt` separates it.
pub fn cache_salt(
    isolation: PrefixCacheIsolation,
    tenant: Option<Tenant>,
    request_salt: Option<&str>,
) -> Option<u64> {
    let tenant = match isolation {
        PrefixCacheIsolation::PerKey => tenant,
        PrefixCacheIsolation::Shared => None,
    };
    if tenant.is_none() && request_salt.is_none() {
        return None;
    }
    // Tagged, length-prefixed fields, so no (tenant, salt) pair can spell another's bytes.
    let mut bytes = Vec::with_capacity(32);
    if let Some(Tenant(t)) = tenant {
        bytes.push(1);
        bytes.extend(t.to_le_bytes());
    }
    if let Some(s) = request_salt {
        bytes.push(2);
        bytes.extend((s.len() as u64).to_le_bytes());
        bytes.extend(s.as_bytes());
    }
    Some(xxh3_64_with_seed(&bytes, SALT_SEED))
}

#[cfg(test)]
mod tests {
    use super::*;
    use PrefixCacheIsolation::{PerKey, Shared};

    #[test]
    fn salts_separate_tenants_only_under_per_key() {
        let (a, b) = (Tenant::from_api_key("sk-a"), Tenant::from_api_key("sk-b"));
        assert_eq!(cache_salt(PerKey, None, None), None);
        assert_ne!(
            cache_salt(PerKey, Some(a), None),
            cache_salt(PerKey, Some(b), None)
        );
        assert_eq!(
            cache_salt(PerKey, Some(a), None),
            cache_salt(PerKey, Some(a), None)
        );
        assert_eq!(cache_salt(Shared, Some(a), None), None);
        assert_eq!(
            cache_salt(Shared, Some(a), Some("x")),
            cache_salt(Shared, Some(b), Some("x"))
        );
        assert_ne!(
            cache_salt(PerKey, Some(a), Some("x")),
            cache_salt(PerKey, Some(a), None)
        );
        assert_ne!(
            cache_salt(PerKey, Some(a), Some("x")),
            cache_salt(PerKey, Some(b), Some("x"))
        );
        assert_ne!(
            cache_salt(Shared, None, Some("x")),
            cache_salt(Shared, None, Some("y"))
        );
    }
}
