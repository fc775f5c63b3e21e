//! A schema registry client (the Confluent Schema Registry REST API, which Apicurio and
//! Karapace speak too): schemas fetched by the id each record carries, once, and cached
//! for the life of the process. A record naming an id the registry does not have is the
//! record's fault (a dead letter); a registry that cannot be reached is not, and fails
//! the attempt so that the restart strategy retries it with nothing lost.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use secrecy::ExposeSecret;
use serde::Deserialize;

use super::avro::AvroSchema;
use super::protobuf::ProtoSchema;
use crate::config::RegistryConfig;
use crate::error::{Error, Result};

/// The first byte of the registry's wire format.
pub const MAGIC: u8 = 0;

/// Split the registry's wire header off a payload: the schema id and the rest.
pub fn split_header(bytes: &[u8]) -> std::result::Result<(u32, &[u8]), String> {
    match bytes {
        [MAGIC, a, b, c, d, rest @ ..] => Ok((u32::from_be_bytes([*a, *b, *c, *d]), rest)),
        [] => Err("empty payload".into()),
        [first, ..] if *first != MAGIC => Err(format!(
            "not in the schema registry's wire format (first byte {first:#04x}, expected 0x00)"
        )),
        _ => Err("shorter than the schema registry's 5-byte header".into()),
    }
}

/// A schema as the registry holds it, parsed.
#[derive(Debug, Clone)]
pub enum Fetched {
    /// An Avro schema.
    Avro(Arc<AvroSchema>),
    /// A compiled `.proto` file.
    Protobuf(Arc<ProtoSchema>),
}

/// The registry's answer for one id: a schema, or why no record can be read with it.
type Entry = std::result::Result<Fetched, String>;

/// A registry client with its cache.
pub struct Registry {
    url: String,
    username: Option<String>,
    password: Option<secrecy::SecretString>,
    timeout: Duration,
    client: reqwest::Client,
    cache: Mutex<HashMap<u32, Entry>>,
}

#[derive(Deserialize)]
struct SchemaResponse {
    schema: String,
    #[serde(default, rename = "schemaType")]
    schema_type: Option<String>,
    #[serde(default)]
    references: Vec<Reference>,
}

#[derive(Deserialize)]
struct Reference {
    name: String,
    subject: String,
    version: i64,
}

/// A fetch of references under way (boxed: it recurses).
type Pending<'a> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<std::result::Result<(), String>>> + Send + 'a>>;

/// How many levels of references are followed.
const MAX_DEPTH: usize = 16;

/// Entries that say an id is unknown are kept too (a flood of records with a bad id
/// must not become a flood of requests), up to this many ids.
const MAX_ENTRIES: usize = 10_000;

impl Registry {
    /// A client for `cfg`.
    pub fn new(cfg: &RegistryConfig) -> Registry {
        Registry {
            url: cfg.url.to_string_unredacted().trim_end_matches('/').to_string(),
            username: cfg.username.clone(),
            password: cfg.password.clone(),
            timeout: cfg.timeout,
            client: reqwest::Client::new(),
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// The schema with `id`. `Ok(Err(reason))` when the registry answers that it cannot
    /// serve it (the record's fault); `Err` when it cannot be asked. Blocking: called on
    /// a source's thread.
    pub fn schema(&self, id: u32) -> Result<Entry> {
        if let Some(hit) = self.cache.lock().map_err(|_| poisoned())?.get(&id) {
            return Ok(hit.clone());
        }
        let entry = block_on(self.fetch(id))??;
        let mut cache = self.cache.lock().map_err(|_| poisoned())?;
        if cache.len() >= MAX_ENTRIES {
            cache.retain(|_, e| e.is_ok());
        }
        cache.insert(id, entry.clone());
        Ok(entry)
    }

    async fn fetch(&self, id: u32) -> Result<Entry> {
        let Some(found) = self.get(&format!("/schemas/ids/{id}")).await? else {
            return Ok(Err(format!("schema id {id} is not in the registry")));
        };
        let mut references = Vec::new();
        if let Err(reason) = self.references(&found.references, &mut references, 0).await? {
            return Ok(Err(format!("schema id {id}: {reason}")));
        }
        let kind = found.schema_type.as_deref().unwrap_or("AVRO");
        Ok(match kind {
            "AVRO" => {
                let texts: Vec<String> = references.into_iter().map(|(_, text)| text).collect();
                AvroSchema::parse(&found.schema, &texts).map(|s| Fetched::Avro(Arc::new(s)))
            }
            "PROTOBUF" => ProtoSchema::compile(&found.schema, &references).map(|s| Fetched::Protobuf(Arc::new(s))),
            other => Err(format!("schema type {other}")),
        }
        .map_err(|e| format!("schema id {id}: {e}")))
    }

    /// Fetch referenced schemas depth first, so each comes after what it refers to.
    fn references<'a>(
        &'a self,
        refs: &'a [Reference],
        out: &'a mut Vec<(String, String)>,
        depth: usize,
    ) -> Pending<'a> {
        Box::pin(async move {
            if depth > MAX_DEPTH {
                return Ok(Err("references nest too deep".into()));
            }
            for r in refs {
                if out.iter().any(|(name, _)| *name == r.name) {
                    continue;
                }
                let path = format!("/subjects/{}/versions/{}", encode(&r.subject), r.version);
                let Some(found) = self.get(&path).await? else {
                    return Ok(Err(format!(
                        "reference {} ({} version {}) is not in the registry",
                        r.name, r.subject, r.version
                    )));
                };
                if let Err(e) = self.references(&found.references, out, depth + 1).await? {
                    return Ok(Err(e));
                }
                out.push((r.name.clone(), found.schema));
            }
            Ok(Ok(()))
        })
    }

    /// Register `text` (of `kind`: `AVRO`, `PROTOBUF`) under `subject`, or find it there:
    /// its id. A schema the subject's compatibility refuses is a setup fault naming it.
    pub async fn register(&self, subject: &str, text: &str, kind: &str) -> Result<u32> {
        let path = format!("/subjects/{}/versions", encode(subject));
        let shown = crate::config::redact_url(&self.url);
        let mut req = self
            .client
            .post(format!("{}{path}", self.url))
            .header("Content-Type", "application/vnd.schemaregistry.v1+json")
            .body(serde_json::json!({"schema": text, "schemaType": kind}).to_string())
            .timeout(self.timeout);
        if let Some(user) = &self.username {
            req = req.basic_auth(user, self.password.as_ref().map(|p| p.expose_secret().to_string()));
        }
        let resp = req
            .send()
            .await
            .map_err(|e| Error::Registry(format!("schema registry {shown}: POST {path}: {e}")))?;
        let status = resp.status();
        let body = resp
            .bytes()
            .await
            .map_err(|e| Error::Registry(format!("schema registry {shown}: POST {path}: {e}")))?;
        let text = String::from_utf8_lossy(&body[..body.len().min(500)]).into_owned();
        if status.is_client_error() && status != reqwest::StatusCode::TOO_MANY_REQUESTS {
            return Err(Error::TargetSetup(format!(
                "schema registry {shown} refused the schema for subject `{subject}`: {status} {text}"
            )));
        }
        if !status.is_success() {
            return Err(Error::Registry(format!(
                "schema registry {shown}: POST {path}: {status} {text}"
            )));
        }
        #[derive(Deserialize)]
        struct Registered {
            id: u32,
        }
        serde_json::from_slice::<Registered>(&body)
            .map(|r| r.id)
            .map_err(|e| Error::Registry(format!("schema registry {shown}: POST {path}: unreadable answer: {e}")))
    }

    /// GET `path`: the schema, `None` for a 404, `Err` when the registry cannot answer.
    async fn get(&self, path: &str) -> Result<Option<SchemaResponse>> {
        let unreachable =
            |e: String| Error::Registry(format!("schema registry {}: {e}", crate::config::redact_url(&self.url)));
        let mut req = self
            .client
            .get(format!("{}{path}", self.url))
            .header("Accept", "application/vnd.schemaregistry.v1+json, application/json")
            .timeout(self.timeout);
        if let Some(user) = &self.username {
            req = req.basic_auth(user, self.password.as_ref().map(|p| p.expose_secret().to_string()));
        }
        let resp = req.send().await.map_err(|e| unreachable(format!("GET {path}: {e}")))?;
        let status = resp.status();
        if status == reqwest::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        let body = resp
            .bytes()
            .await
            .map_err(|e| unreachable(format!("GET {path}: {e}")))?;
        if status.is_client_error() && status != reqwest::StatusCode::TOO_MANY_REQUESTS {
            let text = String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned();
            return Err(Error::TargetSetup(format!(
                "schema registry {} refused GET {path}: {status} {text}",
                crate::config::redact_url(&self.url)
            )));
        }
        if !status.is_success() {
            return Err(unreachable(format!("GET {path}: {status}")));
        }
        serde_json::from_slice(&body)
            .map(Some)
            .map_err(|e| unreachable(format!("GET {path}: unreadable answer: {e}")))
    }
}

fn poisoned() -> Error {
    Error::Internal("the schema cache's lock was poisoned".into())
}

/// Percent-encode a subject for a URL path.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Run a future to completion from a blocking thread: on the runtime the thread belongs
/// to (a source runs on tokio's blocking pool), else on a small runtime of its own.
fn block_on<F: std::future::Future>(f: F) -> Result<F::Output> {
    match tokio::runtime::Handle::try_current() {
        Ok(handle) => Ok(handle.block_on(f)),
        Err(_) => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| Error::Internal(format!("start a runtime for the schema registry: {e}")))?;
            Ok(rt.block_on(f))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wire_header_is_split_or_refused() {
        assert_eq!(split_header(&[0, 0, 0, 1, 2, 9]).unwrap(), (258, &[9u8][..]));
        assert!(split_header(&[1, 0, 0, 0, 1]).unwrap_err().contains("0x01"));
        assert!(split_header(&[0, 0]).unwrap_err().contains("5-byte"));
        assert!(split_header(&[]).is_err());
        assert_eq!(encode("orders-value"), "orders-value");
        assert_eq!(encode("a/b c"), "a%2Fb%20c");
    }
}
