//! The configuration file and environment (SPEC §2): TOML, overridden by
//! `SWITCHBOARD_<SECTION>__<KEY>` variables, overridden by flags; checked
//! before anything is bound, naming the setting at fault.

use std::{collections::HashMap, net::SocketAddr, path::PathBuf, time::Duration};

use figment::{
    Figment,
    providers::{Format, Toml},
};
use serde::{Deserialize, Deserializer};

/// A duration written `25s`, `500ms`, `5m`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dur(pub Duration);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s)
            .map(Dur)
            .map_err(|e| serde::de::Error::custom(format!("{s:?} is not a duration like 25s, 500ms or 5m ({e})")))
    }
}

/// A size in bytes, written as a number or `64MiB`, `512KiB`, `1GiB`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Size(pub u64);

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(u64),
            Text(String),
        }
        let s = match Raw::deserialize(d)? {
            Raw::Number(n) => return Ok(Size(n)),
            Raw::Text(s) => s,
        };
        let digits = s.trim_end_matches(|c: char| c.is_ascii_alphabetic());
        let unit = match &s[digits.len()..] {
            "" | "B" => 1,
            "KiB" => 1 << 10,
            "MiB" => 1 << 20,
            "GiB" => 1 << 30,
            _ => 0,
        };
        match digits.trim().parse::<u64>() {
            Ok(n) if unit > 0 => Ok(Size(n.saturating_mul(unit))),
            _ => Err(serde::de::Error::custom(format!("{s:?} is not a size like 67108864, 512KiB, 64MiB or 1GiB"))),
        }
    }
}

/// One URL or several: a TOML list, or a string of comma-separated URLs
/// (as an environment variable is written).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Urls(pub Vec<String>);

impl<'de> Deserialize<'de> for Urls {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            One(String),
            Many(Vec<String>),
        }
        let urls: Vec<String> = match Raw::deserialize(d)? {
            Raw::One(s) => s.split(',').map(|u| u.trim().to_owned()).filter(|u| !u.is_empty()).collect(),
            Raw::Many(v) => v,
        };
        if urls.is_empty() {
            return Err(serde::de::Error::custom("no URL given"));
        }
        Ok(Urls(urls))
    }
}

fn secs(n: u64) -> Dur {
    Dur(Duration::from_secs(n))
}

#[derive(Debug, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    pub gateway: Gateway,
    pub eventbus: Eventbus,
    pub agent_bridge: AgentBridge,
    pub auth: Auth,
    pub agents: Agents,
    pub limits: Limits,
    /// What our gRPC clients use for `https://` URLs.
    pub tls: Tls,
    pub namespaces: HashMap<String, Namespace>,
    /// Who may call each RPC method (SPEC §7.5): `rpc.<method>`.
    pub rpc: HashMap<String, AccessSetting>,
}

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Gateway {
    pub listen: String,
    pub eventbus_url: Option<Urls>,
    pub agent_bridge_url: Option<Urls>,
    pub node: Option<String>,
    pub heartbeat_interval: Dur,
    pub heartbeat_timeout: Dur,
    pub shutdown_grace: Dur,
    pub allowed_origins: Vec<String>,
    pub default_channels: Vec<String>,
    /// PEM certificate chain and key: HTTPS and WSS only.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
}

impl Default for Gateway {
    fn default() -> Self {
        Gateway {
            listen: "127.0.0.1:8000".into(),
            eventbus_url: None,
            agent_bridge_url: None,
            node: None,
            heartbeat_interval: secs(30),
            heartbeat_timeout: secs(10),
            shutdown_grace: secs(10),
            allowed_origins: switchboard_gateway::config::localhost_origins(),
            default_channels: Vec::new(),
            tls_cert: None,
            tls_key: None,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Eventbus {
    pub listen: String,
    /// Prometheus metrics of the bus, when set.
    pub metrics_listen: Option<String>,
    pub backend: String,
    pub data_dir: PathBuf,
    pub redis_url: Option<String>,
    pub nats_url: Option<String>,
    pub fsync: String,
    pub fsync_interval: Dur,
    pub cache_bytes: Size,
    /// PEM certificate chain and key: gRPC over TLS.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// PEM CA certificates: clients must present a certificate one signed.
    pub tls_client_ca: Option<PathBuf>,
}

impl Default for Eventbus {
    fn default() -> Self {
        Eventbus {
            listen: "127.0.0.1:50051".into(),
            metrics_listen: None,
            backend: "embedded".into(),
            data_dir: PathBuf::from("./data"),
            redis_url: None,
            nats_url: None,
            fsync: "always".into(),
            fsync_interval: Dur(Duration::from_millis(2)),
            cache_bytes: Size(64 << 20),
            tls_cert: None,
            tls_key: None,
            tls_client_ca: None,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentBridge {
    pub listen: String,
    /// Prometheus metrics of the bridge, when set.
    pub metrics_listen: Option<String>,
    pub eventbus_url: Option<String>,
    pub data_dir: PathBuf,
    /// Where threads are kept: `local` (`data_dir`) or `bus` (for several bridges).
    pub threads: String,
    /// As the bus's.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub tls_client_ca: Option<PathBuf>,
}

impl Default for AgentBridge {
    fn default() -> Self {
        AgentBridge {
            listen: "127.0.0.1:50052".into(),
            metrics_listen: None,
            eventbus_url: None,
            data_dir: PathBuf::from("./data"),
            threads: "local".into(),
            tls_cert: None,
            tls_key: None,
            tls_client_ca: None,
        }
    }
}

/// The `[tls]` section: how our gRPC clients (gateway, bridge, `publish`,
/// `tail`, `bench`) reach `https://` URLs.
#[derive(Debug, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct Tls {
    /// PEM CA certificates that sign the servers (the public roots when unset).
    pub ca: Option<PathBuf>,
    /// PEM certificate and key presented to servers that require one (mTLS).
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
}

impl Tls {
    /// The clients' TLS configuration, when any of it is set.
    ///
    /// # Errors
    /// A message naming the setting at fault.
    pub fn client_config(&self) -> Result<Option<switchboard_tls::ClientTls>, String> {
        if self.ca.is_none() && self.client_cert.is_none() && self.client_key.is_none() {
            return Ok(None);
        }
        let files = switchboard_tls::ClientFiles {
            ca: self.ca.clone(),
            cert: self.client_cert.clone(),
            key: self.client_key.clone(),
        };
        switchboard_tls::ClientTls::load(files).map(Some).map_err(|e| e.to_string())
    }
}

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Auth {
    pub anonymous: Option<bool>,
    pub hs256_secret: Option<String>,
    /// PEM files of RS256 (RSA) or ES256 (P-256) public keys.
    pub public_key_files: Vec<PathBuf>,
    /// A JWKS URL whose RS256/ES256 keys verify tokens by their `kid`.
    pub jwks_url: Option<String>,
    /// How often the JWKS is fetched again.
    pub jwks_refresh: Dur,
    /// Bound of each JWKS fetch.
    pub jwks_timeout: Dur,
    /// Required `aud` of tokens, when set.
    pub audience: Option<String>,
    /// Required `iss` of tokens, when set.
    pub issuer: Option<String>,
    pub admin_key: Option<String>,
    pub expiry_grace: Dur,
    pub authorize_timeout: Dur,
}

impl Default for Auth {
    fn default() -> Self {
        Auth {
            anonymous: None,
            hs256_secret: None,
            public_key_files: Vec::new(),
            jwks_url: None,
            jwks_refresh: secs(300),
            jwks_timeout: secs(5),
            audience: None,
            issuer: None,
            admin_key: None,
            expiry_grace: secs(25),
            authorize_timeout: secs(10),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Agents {
    pub default: String,
    pub echo: Echo,
    /// The `openai` agent, when configured.
    pub openai: Option<OpenAi>,
    /// Each run's deadline.
    pub run_deadline: Dur,
    /// Most runs waiting for one thread.
    pub max_enqueued: usize,
    /// Messages each thread keeps (the newest; the agent gets at most these).
    pub thread_max_messages: usize,
}

impl Default for Agents {
    fn default() -> Self {
        Agents {
            default: "echo".into(),
            echo: Echo::default(),
            openai: None,
            run_deadline: secs(300),
            max_enqueued: 16,
            thread_max_messages: switchboard_agent_bridge::threads::DEFAULT_MAX_MESSAGES,
        }
    }
}

/// An OpenAI-compatible chat-completions server.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpenAi {
    pub base_url: String,
    pub model: String,
    /// The environment variable that holds the API key (none for local servers).
    #[serde(default)]
    pub api_key_env: Option<String>,
    #[serde(default = "openai_timeout")]
    pub timeout: Dur,
}

fn openai_timeout() -> Dur {
    secs(60)
}

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Echo {
    pub delay_ms: u64,
}

impl Default for Echo {
    fn default() -> Self {
        Echo { delay_ms: 20 }
    }
}

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    pub max_message_bytes: usize,
    pub max_subscriptions: usize,
    pub max_connections: usize,
    pub max_connections_per_user: usize,
    pub rate_per_second: u32,
    pub rate_burst: u32,
    pub protocol_errors_per_minute: usize,
    pub outbound_queue_bytes: usize,
    pub max_event_bytes: usize,
    pub recovery_max: u64,
    pub history_size: u64,
    pub history_ttl: Dur,
    pub header_timeout: Dur,
    pub write_timeout: Dur,
    pub link_wait: Dur,
    pub max_stream_channels: usize,
}

impl Default for Limits {
    fn default() -> Self {
        let g = switchboard_gateway::Limits::default();
        Limits {
            max_message_bytes: g.max_message_bytes,
            max_subscriptions: g.max_subscriptions,
            max_connections: g.max_connections,
            max_connections_per_user: g.max_connections_per_user,
            rate_per_second: g.rate_per_second,
            rate_burst: g.rate_burst,
            protocol_errors_per_minute: g.protocol_errors_per_minute,
            outbound_queue_bytes: g.outbound_queue_bytes,
            max_event_bytes: 1024 * 1024,
            recovery_max: g.recovery_max,
            history_size: 1000,
            history_ttl: secs(24 * 3600),
            header_timeout: Dur(g.header_timeout),
            write_timeout: Dur(g.write_timeout),
            link_wait: Dur(g.link_wait),
            max_stream_channels: 100_000,
        }
    }
}

/// Who may: `"anonymous"`, `"authenticated"`, `"none"`, or a list of roles.
#[derive(Debug, Deserialize, Clone)]
#[serde(untagged)]
pub enum AccessSetting {
    Word(String),
    Roles(Vec<String>),
}

#[derive(Debug, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct Namespace {
    pub history_size: Option<u64>,
    pub history_ttl: Option<Dur>,
    pub subscribe: Option<AccessSetting>,
    pub publish: Option<AccessSetting>,
    pub presence: bool,
}

/// Reads the file (when given) and the environment.
///
/// # Errors
/// A message naming the setting at fault.
pub fn load(file: Option<&std::path::Path>, env: &HashMap<String, String>) -> Result<Settings, String> {
    let mut figment = Figment::new();
    if let Some(file) = file {
        if !file.exists() {
            return Err(format!("--config: {} does not exist", file.display()));
        }
        figment = figment.merge(Toml::file(file));
    }
    // The environment is passed in (not read here) so that tests never touch
    // the process environment.
    let vars: Vec<(String, String)> = env.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    figment = figment.merge(EnvMap(vars));
    figment.extract::<Settings>().map_err(|e| {
        let key = e.path.join(".");
        // An unknown key is reported at its parent's path.
        let mut path = e.path.clone();
        if let figment::error::Kind::UnknownField(field, _) = &e.kind
            && path.last() != Some(field)
        {
            path.push(field.clone());
        }
        let from_env = env_name(&path, env);
        match (from_env, key.is_empty()) {
            (Some(var), _) => format!("{var} ({}): {e}", var_path(&var).unwrap_or_default().join(".")),
            (None, true) => e.to_string(),
            (None, false) => format!("{key}: {e}"),
        }
    })
}

/// The setting path of a `SWITCHBOARD_<SECTION>__<KEY>` variable, or `None`
/// for a variable without that form (a deployment's own `SWITCHBOARD_BIN`,
/// say), which is not a setting and is ignored (SPEC §8).
fn var_path(name: &str) -> Option<Vec<String>> {
    let rest = name.strip_prefix("SWITCHBOARD_")?;
    let path: Vec<String> = rest.split("__").map(str::to_ascii_lowercase).collect();
    (path.len() >= 2 && path.iter().all(|p| !p.is_empty())).then_some(path)
}

/// The variable that set the setting at `path` (or below it), if one did.
fn env_name(path: &[String], env: &HashMap<String, String>) -> Option<String> {
    if path.is_empty() {
        return None;
    }
    env.keys().find(|k| var_path(k).is_some_and(|p| p.starts_with(path))).cloned()
}

/// `SWITCHBOARD_<SECTION>__<KEY>` variables from a given map, as figment's `Env` would read them.
struct EnvMap(Vec<(String, String)>);

impl figment::Provider for EnvMap {
    fn metadata(&self) -> figment::Metadata {
        figment::Metadata::named("environment variable(s)")
    }

    fn data(&self) -> Result<figment::value::Map<figment::Profile, figment::value::Dict>, figment::Error> {
        use figment::value::{Dict, Value};
        let mut root = Dict::new();
        for (k, v) in &self.0 {
            let Some(path) = var_path(k) else {
                continue;
            };
            let value: Value = v.parse().unwrap_or_else(|_| Value::from(v.clone()));
            let mut dict = &mut root;
            for (i, part) in path.iter().enumerate() {
                if i + 1 == path.len() {
                    dict.insert(part.clone(), value.clone());
                } else {
                    let entry = dict.entry(part.clone()).or_insert_with(|| Value::from(Dict::new()));
                    match entry {
                        Value::Dict(_, d) => dict = d,
                        _ => break,
                    }
                }
            }
        }
        Ok(figment::Profile::Default.collect(root))
    }
}

/// Parses a listen address, naming the key on failure.
pub fn addr(key: &str, value: &str) -> Result<SocketAddr, String> {
    value.parse().map_err(|_| format!("{key}: {value:?} is not an address like 127.0.0.1:8000"))
}
