//! A Redis client, for the lookup tier and the Redis sink alike.

use crate::config::redact_url;
use crate::error::{Error, Result};

/// The environment variable that holds Redis's password, if it needs one.
pub const PASSWORD_ENV: &str = "SLUICE_REDIS_PASSWORD";

/// A client for `url`, with `password` or else the one in [`PASSWORD_ENV`] (a password
/// never sits in the config file).
pub fn client(url: &str, password: Option<&str>) -> Result<redis::Client> {
    let refused = |e: redis::RedisError| Error::Unsupported(format!("redis url {}: {e}", redact_url(url)));
    let mut info = redis::IntoConnectionInfo::into_connection_info(url).map_err(refused)?;
    let env = std::env::var(PASSWORD_ENV).ok();
    if let Some(pw) = password.map(str::to_string).or(env).filter(|p| !p.is_empty()) {
        let settings = info.redis_settings().clone().set_password(pw);
        info = info.set_redis_settings(settings);
    }
    redis::Client::open(info).map_err(refused)
}
