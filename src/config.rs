//! The TOML configuration of a Stretch daemon, and the size syntax shared with the CLI.
//!
//! Example (every key has a default; see docs/operations.md):
//!
//! ```toml
//! data_dir = "/var/lib/stretch"
//!
//! [nbd]
//! listen = ["127.0.0.1:10809"]
//! unix_socket = "/run/stretch/nbd.sock"
//! handshake_timeout_ms = 10000
//! connections_max = 256
//! inflight_bytes_max = 67108864
//!
//! [engine]
//! io_engine = "auto"          # auto | uring | psync
//! direct_io = true            # O_DIRECT data files; false uses the page cache
//!
//! [[volume]]
//! name = "vm-disk-1"
//! size = "20GiB"              # created at start if missing
//! read_only = false
//!
//! [replication]               # `stretch site` only; `stretch serve` ignores it
//! site = "a"                  # a | b
//! cluster_id = 7              # the same at both sites
//! listen = "0.0.0.0:10900"    # this site accepts the link... (or)
//! # peer = "10.0.0.2:10900"   # ...this site dials it
//! request_timeout_ms = 60000
//! admin = "127.0.0.1:10920"   # the site admin API (`stretch status`, `stretch verify`)
//! policy = "sync"             # sync | sync-received | async | adaptive (DESIGN.md §5)
//! active_site = "a"           # the async writer; leads mode switches
//! lag_bytes_max = 67108864    # async: writes wait beyond this lag (bytes)...
//! lag_ms_max = 2000           # ...or beyond this age of the oldest unreplicated write
//! sync_rtt_max_ms = 5.0       # adaptive: async above this smoothed RTT
//!
//! [control]                   # `stretch site` with a witness (DESIGN.md §6)
//! raft_listen = "0.0.0.0:10910"  # this site's voter; `stretch witness --bootstrap` names it
//! preferred = "a"             # who wins a plain link cut (written when the volume is created)
//! on_lapse = "eio"            # eio | suspend: a site whose lease lapsed
//! # raft_peer = "10.0.0.2:10910" # dial the other site's voter here (across the site link)
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde::Deserialize;

/// The whole daemon configuration.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where volume data and metadata live.
    pub data_dir: PathBuf,
    #[serde(default)]
    pub nbd: NbdConfig,
    #[serde(default)]
    pub engine: EngineConfig,
    /// Volumes to export; when empty, every volume found in `data_dir` is exported.
    #[serde(default, rename = "volume")]
    pub volumes: Vec<VolumeConfig>,
    /// Replication to the peer site (`stretch site`); `stretch serve` ignores it.
    #[serde(default)]
    pub replication: Option<ReplicationConfig>,
    /// The control plane (`stretch site` with a witness); without it the sites run with a
    /// fixed map and a lost peer stalls writes until it returns.
    #[serde(default)]
    pub control: Option<ControlConfig>,
}

/// `[control]`: this site's voter in the witness group (DESIGN.md §6).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ControlConfig {
    /// Where this site's Raft voter listens.
    pub raft_listen: SocketAddr,
    /// The site that wins a plain link cut, written into the map when the volume's record is
    /// created: "a" (default) or "b".
    #[serde(default)]
    pub preferred: Option<String>,
    /// What a site whose lease lapsed does with requests: "eio" (default) or "suspend".
    #[serde(default)]
    pub on_lapse: Option<String>,
    /// Dial the other site's voter here instead of at its address in the group (the route
    /// across the inter-site link).
    #[serde(default)]
    pub raft_peer: Option<SocketAddr>,
}

/// `[replication]`: one site of a stretched volume.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ReplicationConfig {
    /// This site: "a" or "b".
    pub site: String,
    /// The same at both sites; frames of another cluster are refused.
    pub cluster_id: u64,
    /// This site accepts the replication link here (exactly one of `listen` and `peer`).
    #[serde(default)]
    pub listen: Option<SocketAddr>,
    /// This site dials the peer (or a link emulator in front of it) here.
    #[serde(default)]
    pub peer: Option<SocketAddr>,
    /// A request replication has not answered by then fails with EIO (outcome unknown).
    #[serde(default = "default_request_timeout_ms")]
    pub request_timeout_ms: u64,
    /// The site admin API (`stretch status`, `stretch verify`); default 127.0.0.1:0 (port
    /// chosen at start and printed as `admin http://ADDR`).
    #[serde(default)]
    pub admin: Option<SocketAddr>,
    /// Ack policy: sync (default), sync-received, async or adaptive (DESIGN.md §5).
    #[serde(default)]
    pub policy: Option<String>,
    /// The one writer under async, and the site that leads mode switches: "a" (default)
    /// or "b".
    #[serde(default)]
    pub active_site: Option<String>,
    /// async: bytes not yet durable at the peer beyond which writes wait (default 64 MiB).
    #[serde(default)]
    pub lag_bytes_max: Option<u64>,
    /// async: age of the oldest write not yet durable at the peer beyond which writes wait
    /// (default 2000 ms).
    #[serde(default)]
    pub lag_ms_max: Option<u64>,
    /// adaptive: smoothed RTT above which the mode may become async (default 5 ms).
    #[serde(default)]
    pub sync_rtt_max_ms: Option<f64>,
}

fn default_request_timeout_ms() -> u64 {
    60_000
}

/// The NBD listener.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct NbdConfig {
    /// TCP addresses to listen on (port 0 picks a free port; the chosen one is printed).
    pub listen: Vec<SocketAddr>,
    /// An optional Unix socket path.
    pub unix_socket: Option<PathBuf>,
    /// A client that has not finished negotiating by then is disconnected.
    pub handshake_timeout_ms: u64,
    /// Connections beyond this are refused.
    pub connections_max: usize,
    /// Payload bytes in flight per connection before the server stops reading requests.
    pub inflight_bytes_max: usize,
}

impl Default for NbdConfig {
    fn default() -> Self {
        NbdConfig {
            listen: vec![SocketAddr::from(([127, 0, 0, 1], 10809))],
            unix_socket: None,
            handshake_timeout_ms: 10_000,
            connections_max: 256,
            inflight_bytes_max: 64 << 20,
        }
    }
}

/// Local storage engine settings.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct EngineConfig {
    /// `auto` (io_uring, falling back to psync with the reason logged), `uring` or `psync`.
    pub io_engine: String,
    /// Open data files with O_DIRECT (bypassing the page cache, as `cache=none` does for a
    /// hypervisor). Durability never depends on it: FLUSH and FUA always fdatasync.
    pub direct_io: bool,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            io_engine: "auto".into(),
            direct_io: true,
        }
    }
}

/// One exported volume.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VolumeConfig {
    pub name: String,
    /// Size such as "20GiB" or a byte count; required only if the volume may need creating.
    #[serde(default)]
    pub size: Option<SizeValue>,
    #[serde(default)]
    pub read_only: bool,
    #[serde(default)]
    pub description: Option<String>,
}

/// A size written either as an integer number of bytes or as a string with a unit.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum SizeValue {
    Bytes(u64),
    Text(String),
}

impl SizeValue {
    pub fn bytes(&self) -> anyhow::Result<u64> {
        match self {
            SizeValue::Bytes(n) => Ok(*n),
            SizeValue::Text(s) => parse_size(s),
        }
    }
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> anyhow::Result<Config> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("read config file {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("parse config file {}", path.display()))
    }

    /// Parses and validates config text.
    pub fn parse(text: &str) -> anyhow::Result<Config> {
        let config: Config = toml::from_str(text)?;
        config.validate()?;
        Ok(config)
    }

    /// A config with defaults for everything but the data directory.
    pub fn with_data_dir(data_dir: PathBuf) -> Config {
        Config {
            data_dir,
            nbd: NbdConfig::default(),
            engine: EngineConfig::default(),
            volumes: Vec::new(),
            replication: None,
            control: None,
        }
    }

    fn validate(&self) -> anyhow::Result<()> {
        if let Some(c) = &self.control {
            if let Some(p) = &c.preferred {
                if !matches!(p.as_str(), "a" | "b") {
                    bail!("[control] preferred must be \"a\" or \"b\", not {p:?}");
                }
            }
            if let Some(l) = &c.on_lapse {
                if !matches!(l.as_str(), "eio" | "suspend") {
                    bail!("[control] on_lapse must be \"eio\" or \"suspend\", not {l:?}");
                }
            }
        }
        if let Some(r) = &self.replication {
            if !matches!(r.site.as_str(), "a" | "b") {
                bail!(
                    "[replication] site must be \"a\" or \"b\", not {:?}",
                    r.site
                );
            }
            if r.listen.is_some() == r.peer.is_some() {
                bail!("[replication] needs exactly one of `listen` (this site accepts the link) and `peer` (this site dials it)");
            }
        }
        if self.nbd.listen.is_empty() && self.nbd.unix_socket.is_none() {
            bail!("[nbd] needs at least one `listen` address or a `unix_socket`");
        }
        if self.nbd.connections_max == 0 {
            bail!("[nbd] connections_max must be at least 1");
        }
        if self.nbd.inflight_bytes_max < (32 << 20) {
            bail!("[nbd] inflight_bytes_max must be at least 33554432 (one maximum-size request)");
        }
        let mut seen = std::collections::BTreeSet::new();
        for v in &self.volumes {
            if !seen.insert(v.name.as_str()) {
                bail!("volume {:?} is listed twice", v.name);
            }
            if let Some(size) = &v.size {
                let bytes = size
                    .bytes()
                    .with_context(|| format!("size of volume {:?}", v.name))?;
                check_volume_size(bytes)?;
            }
        }
        Ok(())
    }
}

/// A volume size must be a positive multiple of the 4096-byte block.
pub fn check_volume_size(bytes: u64) -> anyhow::Result<()> {
    let block = u64::from(stretch_engine::BLOCK_SIZE);
    if bytes == 0 || bytes % block != 0 {
        bail!("volume size {bytes} bytes is not a positive multiple of {block} bytes");
    }
    Ok(())
}

/// Parses "4096", "64k", "512MiB", "20G", "1.5TiB". Binary units throughout (k = KiB): block
/// devices are sized in powers of two, and a decimal "G" that is not a multiple of 4096 would
/// be refused anyway.
pub fn parse_size(text: &str) -> anyhow::Result<u64> {
    let s = text.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    if num.is_empty() {
        bail!("size {text:?} has no number");
    }
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        other => bail!("size {text:?} has an unknown unit {other:?} (use k, M, G or T)"),
    };
    let bytes = if num.contains('.') {
        let value: f64 = num.parse().with_context(|| format!("size {text:?}"))?;
        let scaled = value * (1u64 << shift) as f64;
        if !scaled.is_finite() || scaled >= u64::MAX as f64 || scaled.fract() != 0.0 {
            bail!("size {text:?} is not a whole number of bytes");
        }
        scaled as u64
    } else {
        let value: u64 = num.parse().with_context(|| format!("size {text:?}"))?;
        value
            .checked_mul(1u64 << shift)
            .with_context(|| format!("size {text:?} overflows"))?
    };
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_units() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("64k").unwrap(), 65536);
        assert_eq!(parse_size("512MiB").unwrap(), 512 << 20);
        assert_eq!(parse_size("20G").unwrap(), 20 << 30);
        assert_eq!(parse_size("1.5TiB").unwrap(), 3 << 39);
        assert!(parse_size("").is_err());
        assert!(parse_size("12 parsecs").is_err());
        assert!(parse_size("99999999999T").is_err());
        assert!(parse_size("0.3k").is_err());
    }

    #[test]
    fn full_config_parses() {
        let c = Config::parse(
            r#"
            data_dir = "/tmp/x"
            [nbd]
            listen = ["127.0.0.1:0"]
            unix_socket = "/tmp/x/nbd.sock"
            [engine]
            io_engine = "psync"
            [[volume]]
            name = "a"
            size = "1GiB"
            [[volume]]
            name = "b"
            size = 8192
            read_only = true
            "#,
        )
        .unwrap();
        assert_eq!(c.volumes.len(), 2);
        assert_eq!(
            c.volumes[0].size.as_ref().unwrap().bytes().unwrap(),
            1 << 30
        );
        assert!(c.volumes[1].read_only);
        assert_eq!(c.engine.io_engine, "psync");
        assert_eq!(c.nbd.handshake_timeout_ms, 10_000);
    }

    #[test]
    fn replication_section_parses_and_is_checked() {
        let c = Config::parse(
            "data_dir = \"/x\"\n[replication]\nsite = \"b\"\ncluster_id = 7\npeer = \"127.0.0.1:10900\"\n",
        )
        .unwrap();
        let r = c.replication.unwrap();
        assert_eq!((r.site.as_str(), r.cluster_id), ("b", 7));
        assert_eq!(r.request_timeout_ms, 60_000);
        assert!(r.listen.is_none());
        let both = Config::parse(
            "data_dir = \"/x\"\n[replication]\nsite = \"a\"\ncluster_id = 7\npeer = \"127.0.0.1:1\"\nlisten = \"127.0.0.1:2\"\n",
        )
        .unwrap_err();
        assert!(format!("{both:#}").contains("exactly one"), "{both:#}");
        let bad_site = Config::parse(
            "data_dir = \"/x\"\n[replication]\nsite = \"c\"\ncluster_id = 7\npeer = \"127.0.0.1:1\"\n",
        )
        .unwrap_err();
        assert!(format!("{bad_site:#}").contains("site"), "{bad_site:#}");
    }

    #[test]
    fn bad_configs_get_clear_errors() {
        let unknown = Config::parse("data_dir = \"/x\"\nbogus = 1\n").unwrap_err();
        assert!(format!("{unknown:#}").contains("bogus"), "{unknown:#}");
        let misaligned =
            Config::parse("data_dir = \"/x\"\n[[volume]]\nname = \"a\"\nsize = 1000\n")
                .unwrap_err();
        assert!(
            format!("{misaligned:#}").contains("multiple of 4096"),
            "{misaligned:#}"
        );
        let dup = Config::parse(
            "data_dir = \"/x\"\n[[volume]]\nname = \"a\"\n[[volume]]\nname = \"a\"\n",
        )
        .unwrap_err();
        assert!(format!("{dup:#}").contains("twice"), "{dup:#}");
        let no_listener = Config::parse("data_dir = \"/x\"\n[nbd]\nlisten = []\n").unwrap_err();
        assert!(
            format!("{no_listener:#}").contains("listen"),
            "{no_listener:#}"
        );
        assert!(Config::parse("data_dir = 3").is_err());
    }
}
