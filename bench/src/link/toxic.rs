//! Toxics: the faults a proxy applies to one direction of its connections, in Toxiproxy's JSON
//! shape (`{"name", "type", "stream", "toxicity", "attributes"}`), and the pure fold of a list
//! of toxics into the parameters one connection's data path obeys.
//!
//! Units follow Toxiproxy on the wire (milliseconds, KB/s with KB = 1000 bytes) and carry
//! their unit in the name inside (`delay_us`, `rate_bytes_per_s`).

use serde_json::{json, Map, Value};

/// Which way the bytes flow, in Toxiproxy's words: `upstream` is client -> upstream server,
/// `downstream` is upstream server -> client.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Stream {
    Upstream,
    Downstream,
}

impl Stream {
    pub fn as_str(self) -> &'static str {
        match self {
            Stream::Upstream => "upstream",
            Stream::Downstream => "downstream",
        }
    }

    pub fn parse(s: &str) -> Option<Stream> {
        match s {
            "upstream" => Some(Stream::Upstream),
            "downstream" => Some(Stream::Downstream),
            _ => None,
        }
    }
}

/// What a toxic does. The first six are Toxiproxy's; `Partition` and `Loss` are Stretch
/// extensions (Toxiproxy itself answers 400 "invalid toxic type" to them).
#[derive(Clone, Debug, PartialEq)]
pub enum ToxicKind {
    /// Adds `latency` ms, plus a uniform sample in `[-jitter, +jitter]` ms, to every chunk.
    /// Fractional milliseconds are accepted (Toxiproxy takes integers only) so that
    /// `RTT/2` of an odd RTT is exact.
    Latency { delay_us: u64, jitter_us: u64 },
    /// Paces bytes at `rate` KB/s.
    Bandwidth { rate_bytes_per_s: u64 },
    /// Drops all data; closes the connection after `timeout` ms, or never when 0.
    Timeout { timeout_ms: u64 },
    /// Resets the connection (TCP RST) `timeout` ms after the toxic applies to it.
    ResetPeer { timeout_ms: u64 },
    /// Closes the connection once `bytes` have passed in this direction.
    LimitData { limit_bytes: u64 },
    /// Delays the close of the connection by `delay` ms after the source closed.
    SlowClose { delay_ms: u64 },
    /// Holds all bytes: nothing passes, nothing is lost; on removal the held bytes flow on
    /// in order. This is what a partition looks like to a TCP application (segments are
    /// retransmitted until the path heals), unlike `timeout`, which loses bytes.
    Partition,
    /// Loss as TCP shows it to the application: a lost segment stalls the stream by one
    /// retransmission timeout. Each 1448-byte segment is lost with `probability`; a chunk
    /// with a lost segment is held `stall` ms longer.
    Loss { probability: f64, stall_us: u64 },
}

impl ToxicKind {
    pub fn type_name(&self) -> &'static str {
        match self {
            ToxicKind::Latency { .. } => "latency",
            ToxicKind::Bandwidth { .. } => "bandwidth",
            ToxicKind::Timeout { .. } => "timeout",
            ToxicKind::ResetPeer { .. } => "reset_peer",
            ToxicKind::LimitData { .. } => "limit_data",
            ToxicKind::SlowClose { .. } => "slow_close",
            ToxicKind::Partition => "partition",
            ToxicKind::Loss { .. } => "loss",
        }
    }

    /// A kind with every attribute at Toxiproxy's zero default, or None for an unknown type.
    fn default_for(type_name: &str) -> Option<ToxicKind> {
        Some(match type_name {
            "latency" => ToxicKind::Latency {
                delay_us: 0,
                jitter_us: 0,
            },
            "bandwidth" => ToxicKind::Bandwidth {
                rate_bytes_per_s: 0,
            },
            "timeout" => ToxicKind::Timeout { timeout_ms: 0 },
            "reset_peer" => ToxicKind::ResetPeer { timeout_ms: 0 },
            "limit_data" => ToxicKind::LimitData { limit_bytes: 0 },
            "slow_close" => ToxicKind::SlowClose { delay_ms: 0 },
            "partition" => ToxicKind::Partition,
            "loss" => ToxicKind::Loss {
                probability: 0.0,
                stall_us: 200_000,
            },
            _ => return None,
        })
    }

    /// Applies the attributes present in `attrs` over `self`; absent ones keep their value,
    /// as Toxiproxy does when it decodes an update into a copy of the old toxic.
    fn apply_attributes(&mut self, attrs: &Map<String, Value>) -> Result<(), String> {
        match self {
            ToxicKind::Latency {
                delay_us,
                jitter_us,
            } => {
                if let Some(v) = attrs.get("latency") {
                    *delay_us = ms_to_us(v, "latency")?;
                }
                if let Some(v) = attrs.get("jitter") {
                    *jitter_us = ms_to_us(v, "jitter")?;
                }
            }
            ToxicKind::Bandwidth { rate_bytes_per_s } => {
                if let Some(v) = attrs.get("rate") {
                    *rate_bytes_per_s = non_negative_int(v, "rate")?.saturating_mul(1000);
                }
            }
            ToxicKind::Timeout { timeout_ms } | ToxicKind::ResetPeer { timeout_ms } => {
                if let Some(v) = attrs.get("timeout") {
                    *timeout_ms = non_negative_int(v, "timeout")?;
                }
            }
            ToxicKind::LimitData { limit_bytes } => {
                if let Some(v) = attrs.get("bytes") {
                    *limit_bytes = non_negative_int(v, "bytes")?;
                }
            }
            ToxicKind::SlowClose { delay_ms } => {
                if let Some(v) = attrs.get("delay") {
                    *delay_ms = non_negative_int(v, "delay")?;
                }
            }
            ToxicKind::Partition => {}
            ToxicKind::Loss {
                probability,
                stall_us,
            } => {
                if let Some(v) = attrs.get("probability") {
                    let p = v.as_f64().ok_or("probability: not a number")?;
                    if !(0.0..=1.0).contains(&p) {
                        return Err("probability: must be within [0, 1]".into());
                    }
                    *probability = p;
                }
                if let Some(v) = attrs.get("stall") {
                    *stall_us = ms_to_us(v, "stall")?;
                }
            }
        }
        Ok(())
    }

    fn attributes_json(&self) -> Value {
        match *self {
            ToxicKind::Latency {
                delay_us,
                jitter_us,
            } => {
                json!({"latency": us_to_ms_json(delay_us), "jitter": us_to_ms_json(jitter_us)})
            }
            ToxicKind::Bandwidth { rate_bytes_per_s } => json!({"rate": rate_bytes_per_s / 1000}),
            ToxicKind::Timeout { timeout_ms } | ToxicKind::ResetPeer { timeout_ms } => {
                json!({ "timeout": timeout_ms })
            }
            ToxicKind::LimitData { limit_bytes } => json!({ "bytes": limit_bytes }),
            ToxicKind::SlowClose { delay_ms } => json!({ "delay": delay_ms }),
            ToxicKind::Partition => json!({}),
            ToxicKind::Loss {
                probability,
                stall_us,
            } => {
                json!({"probability": probability, "stall": us_to_ms_json(stall_us)})
            }
        }
    }
}

fn non_negative_int(v: &Value, field: &str) -> Result<u64, String> {
    if let Some(n) = v.as_u64() {
        return Ok(n);
    }
    // Clients that build JSON from floats send 100.0 for 100; accept whole numbers.
    match v.as_f64() {
        Some(f) if f >= 0.0 && f.fract() == 0.0 && f < 1e15 => Ok(f as u64),
        _ => Err(format!("{field}: expected a non-negative integer")),
    }
}

fn ms_to_us(v: &Value, field: &str) -> Result<u64, String> {
    match v.as_f64() {
        Some(ms) if (0.0..1e9).contains(&ms) => Ok((ms * 1000.0).round() as u64),
        _ => Err(format!(
            "{field}: expected a non-negative number of milliseconds"
        )),
    }
}

/// Whole milliseconds go out as JSON integers, so that clients with integer fields (Go's
/// int64) decode what we send; only fractional settings, which Toxiproxy cannot express,
/// go out as floats.
fn us_to_ms_json(us: u64) -> Value {
    if us % 1000 == 0 {
        json!(us / 1000)
    } else {
        json!(us as f64 / 1000.0)
    }
}

/// One named toxic on one proxy.
#[derive(Clone, Debug, PartialEq)]
pub struct Toxic {
    /// Unique within the process; with a connection's salt it decides, once, whether a
    /// toxic with toxicity < 1 applies to that connection (Toxiproxy decides per connection).
    pub id: u64,
    pub name: String,
    pub stream: Stream,
    pub toxicity: f64,
    pub kind: ToxicKind,
}

/// Why a toxic body was refused, mapped to Toxiproxy's status codes by the API.
#[derive(Debug, PartialEq)]
pub enum ToxicError {
    BadBody(String),
    InvalidStream,
    InvalidType,
}

impl Toxic {
    /// Parses a create body with Toxiproxy's defaults: stream `downstream`, toxicity 1,
    /// name `<type>_<stream>`.
    pub fn from_create_json(body: &Value, id: u64) -> Result<Toxic, ToxicError> {
        let obj = body
            .as_object()
            .ok_or_else(|| ToxicError::BadBody("expected a JSON object".into()))?;
        let stream = match obj.get("stream") {
            None | Some(Value::Null) => Stream::Downstream,
            Some(Value::String(s)) if s.is_empty() => Stream::Downstream,
            Some(Value::String(s)) => Stream::parse(s).ok_or(ToxicError::InvalidStream)?,
            Some(_) => return Err(ToxicError::InvalidStream),
        };
        let type_name = obj.get("type").and_then(Value::as_str).unwrap_or("");
        let mut kind = ToxicKind::default_for(type_name).ok_or(ToxicError::InvalidType)?;
        let name = match obj.get("name").and_then(Value::as_str) {
            Some(n) if !n.is_empty() => n.to_string(),
            _ => format!("{}_{}", type_name, stream.as_str()),
        };
        let toxicity = match obj.get("toxicity") {
            None | Some(Value::Null) => 1.0,
            Some(v) => parse_toxicity(v)?,
        };
        if let Some(attrs) = obj.get("attributes") {
            match attrs {
                Value::Object(map) => kind.apply_attributes(map).map_err(ToxicError::BadBody)?,
                Value::Null => {}
                _ => return Err(ToxicError::BadBody("attributes: expected an object".into())),
            }
        }
        Ok(Toxic {
            id,
            name,
            stream,
            toxicity,
            kind,
        })
    }

    /// Applies an update body (`attributes` and `toxicity`); name, type and stream stay.
    pub fn update_from_json(&self, body: &Value) -> Result<Toxic, ToxicError> {
        let obj = body
            .as_object()
            .ok_or_else(|| ToxicError::BadBody("expected a JSON object".into()))?;
        let mut updated = self.clone();
        if let Some(v) = obj.get("toxicity") {
            updated.toxicity = parse_toxicity(v)?;
        }
        if let Some(Value::Object(map)) = obj.get("attributes") {
            updated
                .kind
                .apply_attributes(map)
                .map_err(ToxicError::BadBody)?;
        }
        Ok(updated)
    }

    pub fn to_json(&self) -> Value {
        json!({
            "name": self.name,
            "type": self.kind.type_name(),
            "stream": self.stream.as_str(),
            "toxicity": self.toxicity,
            "attributes": self.kind.attributes_json(),
        })
    }

    /// Whether this toxic applies to the connection with `salt`: a fixed pseudo-random
    /// draw per (connection, toxic), so the answer never flips while both live.
    pub fn applies_to(&self, salt: u64) -> bool {
        if self.toxicity >= 1.0 {
            return true;
        }
        if self.toxicity <= 0.0 {
            return false;
        }
        let draw = splitmix64(salt ^ self.id.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        ((draw >> 11) as f64 / (1u64 << 53) as f64) < self.toxicity
    }
}

fn parse_toxicity(v: &Value) -> Result<f64, ToxicError> {
    match v.as_f64() {
        Some(t) if (0.0..=1.0).contains(&t) => Ok(t),
        _ => Err(ToxicError::BadBody(
            "toxicity: expected a number within [0, 1]".into(),
        )),
    }
}

pub fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// What one direction of one connection must do now: the fold of the toxics that apply.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DirParams {
    /// Latency toxics add up, as Toxiproxy chains them.
    pub delay_us: u64,
    pub jitter_us: u64,
    /// The slowest bandwidth toxic wins; None means unpaced.
    pub rate_bytes_per_s: Option<u64>,
    /// Some partition toxic holds the bytes.
    pub hold: bool,
    /// Some timeout toxic drops the bytes; Some(0) never closes.
    pub drop_close_after_ms: Option<u64>,
    pub reset_after_ms: Option<u64>,
    pub limit_bytes: Option<u64>,
    pub slow_close_ms: u64,
    /// Per-segment loss probability and the stall it costs.
    pub loss: Option<(f64, u64)>,
}

impl DirParams {
    pub fn fold<'a>(toxics: impl Iterator<Item = &'a Toxic>, stream: Stream, salt: u64) -> Self {
        let mut p = DirParams::default();
        for t in toxics.filter(|t| t.stream == stream && t.applies_to(salt)) {
            match t.kind {
                ToxicKind::Latency {
                    delay_us,
                    jitter_us,
                } => {
                    p.delay_us = p.delay_us.saturating_add(delay_us);
                    p.jitter_us = p.jitter_us.saturating_add(jitter_us);
                }
                ToxicKind::Bandwidth { rate_bytes_per_s } => {
                    // Toxiproxy treats rate 0 as "no limit".
                    if rate_bytes_per_s > 0 {
                        p.rate_bytes_per_s = Some(
                            p.rate_bytes_per_s
                                .map_or(rate_bytes_per_s, |r| r.min(rate_bytes_per_s)),
                        );
                    }
                }
                ToxicKind::Timeout { timeout_ms } => {
                    p.drop_close_after_ms = Some(match p.drop_close_after_ms {
                        None => timeout_ms,
                        Some(0) => timeout_ms,
                        Some(old) if timeout_ms == 0 => old,
                        Some(old) => old.min(timeout_ms),
                    });
                }
                ToxicKind::ResetPeer { timeout_ms } => {
                    p.reset_after_ms =
                        Some(p.reset_after_ms.map_or(timeout_ms, |o| o.min(timeout_ms)));
                }
                ToxicKind::LimitData { limit_bytes } => {
                    p.limit_bytes = Some(p.limit_bytes.map_or(limit_bytes, |o| o.min(limit_bytes)));
                }
                ToxicKind::SlowClose { delay_ms } => {
                    p.slow_close_ms = p.slow_close_ms.max(delay_ms)
                }
                ToxicKind::Partition => p.hold = true,
                ToxicKind::Loss {
                    probability,
                    stall_us,
                } => {
                    p.loss = Some(match p.loss {
                        None => (probability, stall_us),
                        Some((q, s)) => (1.0 - (1.0 - q) * (1.0 - probability), s.max(stall_us)),
                    });
                }
            }
        }
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_defaults_match_toxiproxy() {
        // Toxiproxy toxic_collection.go: stream defaults to downstream, toxicity to 1,
        // name to "<type>_<stream>".
        let t = Toxic::from_create_json(
            &json!({"type": "latency", "attributes": {"latency": 10}}),
            1,
        )
        .expect("valid body");
        assert_eq!(t.name, "latency_downstream");
        assert_eq!(t.stream, Stream::Downstream);
        assert_eq!(t.toxicity, 1.0);
        assert_eq!(
            t.kind,
            ToxicKind::Latency {
                delay_us: 10_000,
                jitter_us: 0
            }
        );
        assert_eq!(
            t.to_json()["attributes"],
            json!({"latency": 10, "jitter": 0})
        );
    }

    #[test]
    fn bad_bodies_are_refused_with_the_right_error() {
        assert_eq!(
            Toxic::from_create_json(&json!({"type": "nosuch"}), 1),
            Err(ToxicError::InvalidType)
        );
        assert_eq!(
            Toxic::from_create_json(&json!({"type": "latency", "stream": "sideways"}), 1),
            Err(ToxicError::InvalidStream)
        );
        assert!(matches!(
            Toxic::from_create_json(
                &json!({"type": "latency", "attributes": {"latency": -1}}),
                1
            ),
            Err(ToxicError::BadBody(_))
        ));
    }

    #[test]
    fn update_keeps_absent_attributes() {
        let t = Toxic::from_create_json(
            &json!({"type": "latency", "attributes": {"latency": 10, "jitter": 2}}),
            1,
        )
        .expect("valid body");
        let u = t
            .update_from_json(&json!({"attributes": {"latency": 2.5}}))
            .expect("valid update");
        assert_eq!(
            u.kind,
            ToxicKind::Latency {
                delay_us: 2_500,
                jitter_us: 2_000
            }
        );
        assert_eq!(u.to_json()["attributes"]["latency"], json!(2.5));
    }

    #[test]
    fn fold_sums_latency_and_takes_slowest_rate() {
        let a = Toxic::from_create_json(&json!({"name": "a", "type": "latency", "stream": "upstream", "attributes": {"latency": 1}}), 1).expect("valid");
        let b = Toxic::from_create_json(&json!({"name": "b", "type": "latency", "stream": "upstream", "attributes": {"latency": 2}}), 2).expect("valid");
        let c = Toxic::from_create_json(&json!({"name": "c", "type": "bandwidth", "stream": "upstream", "attributes": {"rate": 100}}), 3).expect("valid");
        let d = Toxic::from_create_json(&json!({"name": "d", "type": "bandwidth", "stream": "upstream", "attributes": {"rate": 50}}), 4).expect("valid");
        let e = Toxic::from_create_json(
            &json!({"name": "e", "type": "partition", "stream": "downstream"}),
            5,
        )
        .expect("valid");
        let all = [a, b, c, d, e];
        let up = DirParams::fold(all.iter(), Stream::Upstream, 7);
        assert_eq!(up.delay_us, 3_000);
        assert_eq!(up.rate_bytes_per_s, Some(50_000));
        assert!(!up.hold);
        let down = DirParams::fold(all.iter(), Stream::Downstream, 7);
        assert!(down.hold);
        assert_eq!(down.delay_us, 0);
    }

    #[test]
    fn toxicity_selects_a_stable_fraction_of_connections() {
        let t = Toxic::from_create_json(&json!({"type": "partition", "toxicity": 0.25}), 42)
            .expect("valid");
        let hits = (0..10_000u64)
            .filter(|salt| t.applies_to(splitmix64(*salt)))
            .count();
        assert!(
            (2_200..2_800).contains(&hits),
            "{hits} of 10000 connections hit"
        );
        assert_eq!(t.applies_to(99), t.applies_to(99));
    }
}
