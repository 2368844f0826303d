//! Client authentication and authorization: JWT verification and grants.
//!
//! This module owns turning a presented token into a [`Principal`] (the user
//! and what they may do), the grant syntax (`general:rw`, `team-*:r`), the
//! direct-message room rule (`dm:alice:bob`) and minting HS256 tokens for
//! operators and tests. It must not touch sockets or HTTP, and it must never
//! log, echo or store a token: errors name what was wrong, not the token.
//!
//! Verification is pinned to the configured key's algorithm (HS256, RS256
//! or ES256), so `alg: none`, a different algorithm or an HMAC made with a
//! public key are refused. `exp` is required; `nbf` is checked when present;
//! `iss` and `aud` are required and checked when configured.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use ring::digest::{SHA256, digest};
use serde::{Deserialize, Serialize};

use crate::config::Config;

/// The shortest accepted HS256 secret, in bytes (256 bits).
pub const HS256_SECRET_MIN_BYTES: usize = 32;
/// The longest token looked at; longer ones are refused unread.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;
/// The most grants one token may carry.
pub const MAX_GRANTS: usize = 256;

/// What a request needs on a room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// `join`, `history` and, through membership, presence.
    Read,
    /// `send` and `typing`.
    Write,
}

/// One grant: a room pattern (`*` matches any run of characters) and rights.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pattern: String,
    read: bool,
    write: bool,
}

impl Grant {
    /// Parses `PATTERN:RIGHTS`, where RIGHTS is `r`, `w` or `rw`. The
    /// pattern follows the room-name rules, plus `*`; it may itself contain
    /// `:`, so the rights are what follows the last one.
    pub fn parse(text: &str) -> Result<Grant, GrantError> {
        let (pattern, rights) = text.rsplit_once(':').ok_or(GrantError::NoRights)?;
        if rights.is_empty() || !rights.bytes().all(|b| b == b'r' || b == b'w') {
            return Err(GrantError::NoRights);
        }
        let name_part = pattern.replace('*', "x");
        protocol::names::validate_room(&name_part).map_err(GrantError::Pattern)?;
        Ok(Grant {
            pattern: pattern.to_owned(),
            read: rights.contains('r'),
            write: rights.contains('w'),
        })
    }

    fn allows(&self, room: &str, access: Access) -> bool {
        let right = match access {
            Access::Read => self.read,
            Access::Write => self.write,
        };
        right && glob_match(&self.pattern, room)
    }
}

/// Why a grant was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GrantError {
    #[error("a grant is `PATTERN:RIGHTS` with RIGHTS one of r, w, rw")]
    NoRights,
    #[error("a grant's room pattern is invalid")]
    Pattern(#[source] protocol::names::NameError),
}

pub use crate::glob::glob_match;

/// The room-name prefix of direct-message rooms.
pub const DM_PREFIX: &str = "dm:";

/// For a direct-message room (`dm:alice:bob`, the two users sorted and
/// different), its two users. `Ok(None)` for any other room; `Err` for a
/// name that starts with `dm:` but is not a valid pair.
pub fn dm_pair(room: &str) -> Result<Option<(&str, &str)>, DmError> {
    let Some(rest) = room.strip_prefix(DM_PREFIX) else {
        return Ok(None);
    };
    let (a, b) = rest.split_once(':').ok_or(DmError)?;
    if protocol::names::validate_user(a).is_err()
        || protocol::names::validate_user(b).is_err()
        || a >= b
    {
        return Err(DmError);
    }
    Ok(Some((a, b)))
}

/// A `dm:` room name that is not `dm:USER1:USER2` with USER1 < USER2.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a direct-message room is `dm:A:B`: two different user names, sorted")]
pub struct DmError;

/// Who a session is and what it may do.
#[derive(Debug, Clone)]
pub struct Principal {
    pub user: Arc<str>,
    grants: Vec<Grant>,
    /// Dev mode: every room but other users' direct messages.
    everything: bool,
    /// When the token expires, in Unix seconds; `None` in dev mode.
    pub expires_at: Option<u64>,
}

impl Principal {
    /// A dev-mode user: no token, every room except other users' DMs.
    pub fn dev(user: Arc<str>) -> Principal {
        Principal {
            user,
            grants: Vec::new(),
            everything: true,
            expires_at: None,
        }
    }

    /// Whether this principal may `access` `room`. A DM room is open to its
    /// two users only, whatever the grants say. The room name must already
    /// be valid (an invalid DM name is refused here too).
    pub fn may(&self, room: &str, access: Access) -> bool {
        match dm_pair(room) {
            Ok(Some((a, b))) => *self.user == *a || *self.user == *b,
            Err(DmError) => false,
            Ok(None) => self.everything || self.grants.iter().any(|g| g.allows(room, access)),
        }
    }
}

/// Why a token was refused. The `Display` text is safe to send to the
/// client as a close reason: it never contains the token.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("no token: send `Authorization: Bearer`, `?token=` or a first `auth` frame")]
    Missing,
    #[error("token is longer than {MAX_TOKEN_BYTES} bytes")]
    TooLong,
    #[error("{reason}")]
    Jwt {
        reason: &'static str,
        #[source]
        source: jsonwebtoken::errors::Error,
    },
    #[error("token subject is not a valid user name")]
    BadSubject(#[source] protocol::names::NameError),
    #[error("token has more than {MAX_GRANTS} grants")]
    TooManyGrants,
    #[error("token grant is invalid")]
    BadGrant(#[source] GrantError),
    /// The admin token, or a token claiming admin rights. Its text is that
    /// of any malformed token, so the client port cannot be used to tell
    /// the admin token apart from a guess; the metric label says which.
    #[error("token is malformed")]
    AdminToken,
    #[error("the refresh token is for another user")]
    OtherUser,
    #[error("the token expired")]
    Expired,
    #[error("cannot sign the token")]
    Sign(#[source] jsonwebtoken::errors::Error),
}

impl AuthError {
    /// A short stable name, for the `reason` label of the auth-failure metric.
    pub fn label(&self) -> &'static str {
        match self {
            AuthError::Missing => "missing",
            AuthError::TooLong => "too_long",
            AuthError::Jwt { source, .. } => match source.kind() {
                ErrorKind::ExpiredSignature => "expired",
                ErrorKind::ImmatureSignature => "not_yet_valid",
                ErrorKind::InvalidSignature => "bad_signature",
                ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => "bad_algorithm",
                ErrorKind::InvalidIssuer => "bad_issuer",
                ErrorKind::InvalidAudience => "bad_audience",
                ErrorKind::MissingRequiredClaim(_) => "missing_claim",
                _ => "malformed",
            },
            AuthError::BadSubject(_) => "bad_subject",
            AuthError::TooManyGrants => "too_many_grants",
            AuthError::BadGrant(_) => "bad_grant",
            AuthError::AdminToken => "admin_token",
            AuthError::OtherUser => "other_user",
            AuthError::Expired => "expired",
            AuthError::Sign(_) => "sign",
        }
    }

    fn from_jwt(source: jsonwebtoken::errors::Error) -> AuthError {
        let reason = match source.kind() {
            ErrorKind::ExpiredSignature => "token expired",
            ErrorKind::ImmatureSignature => "token not valid yet (nbf)",
            ErrorKind::InvalidSignature => "token signature is invalid",
            ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => {
                "token algorithm is not accepted"
            }
            ErrorKind::InvalidIssuer => "token issuer is not accepted",
            ErrorKind::InvalidAudience => "token audience is not accepted",
            ErrorKind::MissingRequiredClaim(_) => "token lacks a required claim (exp, iss, aud)",
            _ => "token is malformed",
        };
        AuthError::Jwt { reason, source }
    }
}

/// Why the configured token key could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum AuthSetupError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a usable public key")]
    Key {
        path: PathBuf,
        #[source]
        source: jsonwebtoken::errors::Error,
    },
    #[error("the HS256 secret must be at least {HS256_SECRET_MIN_BYTES} bytes")]
    SecretTooShort,
}

/// The claims a client token carries.
#[derive(Debug, Deserialize)]
struct Claims {
    // Optional here so that a missing one is reported by the validation
    // as a missing claim, not as a malformed token.
    #[serde(default)]
    sub: Option<String>,
    #[serde(default)]
    exp: Option<u64>,
    #[serde(default)]
    grants: Vec<String>,
    #[serde(default)]
    admin: bool,
}

/// Verifies client tokens with the configured key.
pub struct Verifier {
    key: DecodingKey,
    validation: Validation,
    /// SHA-256 of the admin API token, which is refused on the client socket.
    admin_digest: Option<Vec<u8>>,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("algorithms", &self.validation.algorithms)
            .finish_non_exhaustive()
    }
}

fn read(path: &Path) -> Result<Vec<u8>, AuthSetupError> {
    std::fs::read(path).map_err(|source| AuthSetupError::Read {
        path: path.to_owned(),
        source,
    })
}

/// The configured HS256 secret, from `auth_hs256_secret` or its file.
pub fn hs256_secret(config: &Config) -> Result<Option<Vec<u8>>, AuthSetupError> {
    let secret = match (&config.auth_hs256_secret, &config.auth_hs256_secret_file) {
        (Some(s), _) => s.expose().as_bytes().to_vec(),
        (None, Some(path)) => {
            let bytes = read(path)?;
            String::from_utf8_lossy(&bytes).trim().as_bytes().to_vec()
        }
        (None, None) => return Ok(None),
    };
    if secret.len() < HS256_SECRET_MIN_BYTES {
        return Err(AuthSetupError::SecretTooShort);
    }
    Ok(Some(secret))
}

impl Verifier {
    /// The verifier of `config`'s key, or `None` in dev mode.
    pub fn from_config(config: &Config) -> Result<Option<Verifier>, AuthSetupError> {
        let key_err = |path: &Path| {
            let path = path.to_owned();
            move |source| AuthSetupError::Key { path, source }
        };
        let (alg, key) = if let Some(secret) = hs256_secret(config)? {
            (Algorithm::HS256, DecodingKey::from_secret(&secret))
        } else if let Some(path) = &config.auth_rs256_public_key {
            let pem = read(path)?;
            let key = DecodingKey::from_rsa_pem(&pem).map_err(key_err(path))?;
            (Algorithm::RS256, key)
        } else if let Some(path) = &config.auth_es256_public_key {
            let pem = read(path)?;
            let key = DecodingKey::from_ec_pem(&pem).map_err(key_err(path))?;
            (Algorithm::ES256, key)
        } else {
            return Ok(None);
        };
        let mut validation = Validation::new(alg);
        validation.leeway = config.auth_leeway_secs;
        validation.validate_exp = true;
        validation.validate_nbf = true;
        let mut required = vec!["exp", "sub"];
        if let Some(iss) = &config.auth_issuer {
            validation.set_issuer(&[iss]);
            required.push("iss");
        }
        match &config.auth_audience {
            Some(aud) => {
                validation.set_audience(&[aud]);
                required.push("aud");
            }
            None => validation.validate_aud = false,
        }
        validation.set_required_spec_claims(&required);
        let admin_digest = config
            .admin_token
            .as_ref()
            .map(|t| digest(&SHA256, t.expose().as_bytes()).as_ref().to_vec());
        Ok(Some(Verifier {
            key,
            validation,
            admin_digest,
        }))
    }

    /// Verifies `token` and returns who it names and what they may do.
    pub fn verify(&self, token: &str) -> Result<Principal, AuthError> {
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        if token.len() > MAX_TOKEN_BYTES {
            return Err(AuthError::TooLong);
        }
        if self
            .admin_digest
            .as_ref()
            .is_some_and(|d| digest(&SHA256, token.as_bytes()).as_ref() == d.as_slice())
        {
            return Err(AuthError::AdminToken);
        }
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation)
            .map_err(AuthError::from_jwt)?;
        let claims = data.claims;
        let (Some(sub), Some(exp)) = (claims.sub, claims.exp) else {
            return Err(AuthError::from_jwt(
                ErrorKind::MissingRequiredClaim("exp/sub".into()).into(),
            ));
        };
        if claims.admin {
            return Err(AuthError::AdminToken);
        }
        protocol::names::validate_user(&sub).map_err(AuthError::BadSubject)?;
        if claims.grants.len() > MAX_GRANTS {
            return Err(AuthError::TooManyGrants);
        }
        let grants = claims
            .grants
            .iter()
            .map(|g| Grant::parse(g))
            .collect::<Result<Vec<_>, _>>()
            .map_err(AuthError::BadGrant)?;
        Ok(Principal {
            user: Arc::from(sub),
            grants,
            everything: false,
            expires_at: Some(exp),
        })
    }

    /// The leeway on `exp`, in seconds: a session closes this long after it.
    pub fn leeway_secs(&self) -> u64 {
        self.validation.leeway
    }
}

/// What a minted token says.
#[derive(Debug, Clone, Default, Serialize)]
pub struct MintClaims {
    pub sub: String,
    pub exp: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub aud: Option<String>,
    pub grants: Vec<String>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub admin: bool,
}

/// Signs `claims` with an HS256 secret (the `switchboard token` command).
pub fn mint_hs256(secret: &[u8], claims: &MintClaims) -> Result<String, AuthError> {
    for g in &claims.grants {
        Grant::parse(g).map_err(AuthError::BadGrant)?;
    }
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret),
    )
    .map_err(AuthError::Sign)
}

/// Seconds since the Unix epoch.
pub fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob_match("general", "general"));
        assert!(!glob_match("general", "general2"));
        assert!(glob_match("team-*", "team-a"));
        assert!(glob_match("team-*", "team-"));
        assert!(!glob_match("team-*", "teams"));
        assert!(glob_match("*", "anything"));
        assert!(glob_match("a*b*c", "aXXbYYc"));
        assert!(!glob_match("a*b*c", "aXXbYY"));
        assert!(glob_match(&"*".repeat(64), &"a".repeat(128)));
    }

    #[test]
    fn grants_parse_and_allow() {
        let g = Grant::parse("team-*:r").unwrap();
        assert!(g.allows("team-x", Access::Read));
        assert!(!g.allows("team-x", Access::Write));
        let g = Grant::parse("ops:east:rw").unwrap();
        assert!(g.allows("ops:east", Access::Write));
        for bad in ["general", "general:", "general:x", "bad room:r", ":r"] {
            assert!(Grant::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn dm_rooms_belong_to_their_two_users() {
        assert_eq!(dm_pair("dm:alice:bob"), Ok(Some(("alice", "bob"))));
        assert_eq!(dm_pair("general"), Ok(None));
        assert!(dm_pair("dm:bob:alice").is_err());
        assert!(dm_pair("dm:alice:alice").is_err());
        assert!(dm_pair("dm:alice").is_err());
        assert!(dm_pair("dm:a:b:c").is_err());
        let carol = Principal::dev(Arc::from("carol"));
        assert!(!carol.may("dm:alice:bob", Access::Read));
        assert!(carol.may("general", Access::Write));
        let alice = Principal::dev(Arc::from("alice"));
        assert!(alice.may("dm:alice:bob", Access::Write));
    }
}
#[cfg(test)]
mod verify_tests {
    use super::*;
    use crate::config::Secret;

    const SECRET: &str = "unit-test-secret-of-at-least-32-bytes";

    fn verifier(tweak: impl FnOnce(&mut Config)) -> Verifier {
        let mut config = Config {
            auth_hs256_secret: Some(Secret::new(SECRET)),
            ..Config::default()
        };
        tweak(&mut config);
        Verifier::from_config(&config).unwrap().unwrap()
    }

    fn mint(claims: &MintClaims) -> String {
        mint_hs256(SECRET.as_bytes(), claims).unwrap()
    }

    #[test]
    fn a_minted_token_verifies_with_its_grants() {
        let v = verifier(|c| {
            c.auth_issuer = Some("me".into());
            c.auth_audience = Some("chat".into());
        });
        let token = mint(&MintClaims {
            sub: "alice".into(),
            exp: now_unix() + 60,
            iss: Some("me".into()),
            aud: Some("chat".into()),
            grants: vec!["general:rw".into(), "team-*:r".into()],
            ..Default::default()
        });
        let p = v.verify(&token).unwrap();
        assert_eq!(&*p.user, "alice");
        assert!(p.may("general", Access::Write));
        assert!(p.may("team-x", Access::Read));
        assert!(!p.may("team-x", Access::Write));
        assert!(!p.may("random", Access::Read));
    }
}
