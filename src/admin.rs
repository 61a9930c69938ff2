//! The site admin API: a small JSON-over-HTTP interface that `stretch status` and
//! `stretch verify` use (DESIGN.md §8), served by `stretch site` on `--admin ADDR`.
//!
//! Routes (every answer is JSON; errors are `{"error": message, "status": code}`):
//! - `GET /v1/status`: this site's view of the volume — role, epoch, link, RTT, dirty blocks,
//!   resync progress, driver and link counters. A control plane adds its own facts (Raft
//!   leader, lease, per-CG site states, policy) as an optional `"control"` object through
//!   [`ControlView`]; readers must accept its absence.
//! - `GET /v1/blocks?lba=N&count=M` (1 ≤ M ≤ 4096): per block the CRC-32 of its data, its
//!   16-byte stamp in hex, and whether it may differ from the peer right now. A block that
//!   fails its checksum is reported `"state": "unreadable"` instead of failing the call.
//!
//! - `POST /v1/repair {"lbas": [N, ...], "ranges": [[FIRST, COUNT], ...], "force": false}`
//!   (at most 4096 blocks in all): repairs the blocks at this site from the peer, which must
//!   be in sync at the current epoch (`ReplicatedVolume::repair_blocks`, DESIGN.md §4
//!   "Repair"). Each block takes the peer's version if it fails its checksum here or the
//!   peer's stamp is greater; `force` also takes an equal stamp (`verify --repair --from`).
//!   409 if this site is not in sync with its peer, or a block could not be repaired.
//!
//! Every request is bounded: the HTTP server limits header and body bytes (1 MiB), the time
//! to send a request and the connections served at once; this module limits the blocks per
//! call. Bad input gets a 4xx and the site keeps serving.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use serde_json::{json, Value};
use stretch_bench::http::{handler, HttpServer, Request, Response};
use stretch_engine::{BlockDevice, BlockError, Stamp, Volume, BLOCK_SIZE};
use stretch_replicator::core::{AckPolicy, Mode, Role};
use stretch_replicator::driver::DriverStats;
use stretch_replicator::link::LinkStats;
use stretch_replicator::ReplicatedVolume;

use crate::progress::{Progress, ResyncMonitor};

/// The version of this API's JSON shapes; a reader refuses a major version it does not know.
pub(crate) const API_VERSION: u32 = 1;
/// Blocks one `GET /v1/blocks` may ask for (16 MiB of data read, ~400 KiB of JSON).
pub(crate) const BLOCKS_PER_CALL_MAX: u64 = 4096;
/// Blocks one `POST /v1/repair` may name (the same bound: one verify batch at most).
pub(crate) const REPAIR_BLOCKS_PER_CALL_MAX: u64 = 4096;
const BLOCK_BYTES: u64 = BLOCK_SIZE as u64;

/// A boxed future of the admin API's control-plane calls: the outcome, or why it failed.
pub(crate) type BoxFuture<'a, T> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<T, String>> + Send + 'a>>;

const NO_WITNESS: &str =
    "this site runs without a witness (no --raft-listen): there is no cluster map to change";

/// What the control plane knows and the status reports: filled by the witness integration.
pub(crate) trait ControlView: Send + Sync {
    /// The epoch of the volume's CG as this site knows it.
    fn epoch(&self) -> u32;
    /// Control-plane facts for `GET /v1/status` under `"control"` (Raft leader, lease expiry,
    /// per-CG site states, policy/mode), or None to leave the key out.
    fn status_json(&self) -> Option<Value>;
    /// `stretch detach --survivor SITE`: commits a detach naming `survivor` at the current
    /// epoch; the outcome as text, or why it could not be proposed.
    fn detach(
        &self,
        survivor: &str,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<String, String>> + Send + '_>>
    {
        let _ = survivor;
        Box::pin(async {
            Err("this site runs without a witness (no --raft-listen): there is no cluster map to detach in".to_string())
        })
    }
    /// Whether a cluster map holds the volume's policy (a witness group): a policy change
    /// is then committed there and reaches both sites; without one each site is told alone.
    fn has_map(&self) -> bool {
        false
    }
    /// `stretch volume policy` / `handoff` with a witness: commits the volume's ack policy
    /// and/or the async writer in the cluster map.
    fn set_policy(
        &self,
        ack: Option<AckPolicy>,
        active_site: Option<u8>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<String, String>> + Send + '_>>
    {
        let _ = (ack, active_site);
        Box::pin(async { Err("this site runs without a witness".to_string()) })
    }
    /// `stretch force-survivor`: without `accept_data_loss` only the report of what would be
    /// done and what may be lost.
    fn force_survivor(
        &self,
        accept_data_loss: bool,
    ) -> BoxFuture<'_, crate::control::ForceOutcome> {
        let _ = accept_data_loss;
        Box::pin(async { Err(NO_WITNESS.to_string()) })
    }
    /// `stretch readmit`: the survivor of a force-survivor adds the members back as voters.
    fn readmit(
        &self,
        witness: Option<SocketAddr>,
        peer: Option<SocketAddr>,
    ) -> BoxFuture<'_, String> {
        let _ = (witness, peer);
        Box::pin(async { Err(NO_WITNESS.to_string()) })
    }
}

/// The fixed map `stretch site` runs with until a control plane is attached.
pub(crate) struct FixedControl {
    pub(crate) epoch: u32,
}

impl ControlView for FixedControl {
    fn epoch(&self) -> u32 {
        self.epoch
    }
    fn status_json(&self) -> Option<Value> {
        None
    }
}

/// Everything the admin API reads.
pub(crate) struct AdminState {
    pub(crate) site_name: String,
    pub(crate) volume_name: String,
    pub(crate) device: Arc<ReplicatedVolume>,
    pub(crate) resync: ResyncMonitor,
    /// Set once by the control plane; until then the fixed map's view is reported.
    control: OnceLock<Arc<dyn ControlView>>,
    fixed: FixedControl,
}

impl AdminState {
    pub(crate) fn new(
        site_name: String,
        volume_name: String,
        device: Arc<ReplicatedVolume>,
        fixed_epoch: u32,
    ) -> AdminState {
        AdminState {
            site_name,
            volume_name,
            resync: ResyncMonitor::start(device.clone()),
            device,
            control: OnceLock::new(),
            fixed: FixedControl { epoch: fixed_epoch },
        }
    }

    /// Attaches the control plane's view (a second call is ignored: false).
    pub(crate) fn set_control(&self, control: Arc<dyn ControlView>) -> bool {
        self.control.set(control).is_ok()
    }

    fn control(&self) -> &dyn ControlView {
        match self.control.get() {
            Some(c) => c.as_ref(),
            None => &self.fixed,
        }
    }

    /// The `GET /v1/status` object.
    pub(crate) fn status_json(&self) -> Value {
        let stats = self.device.driver_stats();
        let link = self.device.link_stats();
        let mut progress = self.resync.progress();
        // The monitor samples every 500 ms; the count itself is as fresh as the counters.
        progress.blocks_left = stats.dirty_blocks;
        progress.eta_s = (progress.rate_blocks_per_s > 0.0)
            .then(|| stats.dirty_blocks as f64 / progress.rate_blocks_per_s);
        let size_bytes = self.device.size_bytes();
        let role = role_name(stats.role);
        let control = self.control();
        let mut status = json!({
            "api_version": API_VERSION,
            "site": self.site_name,
            "volume": {
                "name": self.volume_name,
                "size_bytes": size_bytes,
                "block_bytes": BLOCK_BYTES,
                "blocks": size_bytes / BLOCK_BYTES,
            },
            "replication": {
                "role": role,
                "epoch": control.epoch(),
                "link_up": stats.link_up,
                "rtt_us_smoothed": stats.rtt_us_smoothed,
                "dirty_blocks": stats.dirty_blocks,
                "untrusted_blocks": stats.untrusted_blocks,
                // Blocks that fail their checksum here and could not be copied to the peer
                // (DESIGN.md §4 "Repair"): a survivor's resync waits on them.
                "unrecoverable_blocks": stats.unrecoverable_blocks,
                "lag_bytes": stats.lag_bytes,
                "lag_us": stats.lag_us,
                "policy": stats.policy.ack.name(),
                "active_site": if stats.policy.active_site == 0 { "a" } else { "b" },
                // null while this site waits to hear the mode from the leading site.
                "mode": stats.mode.map(Mode::name),
                "async_writer": match stats.mode {
                    Some(Mode::Async { active }) => Some(if active == 0 { "a" } else { "b" }),
                    _ => None,
                },
                "mode_switches": stats.replica.mode_switches,
                "requests_refused_passive": stats.replica.requests_refused_passive,
                // A catching-up site serves reads (DESIGN.md §4 "Resync"): from blocks
                // already resynced, or once the survivor copied the block first.
                "catchup_reads_local": stats.replica.catchup_reads_local,
                "catchup_reads_pulled": stats.replica.catchup_reads_pulled,
                // Durability is single-copy whenever this site serves without its peer.
                "single_copy": matches!(stats.role, Some(Role::Survivor)),
                "failed": stats.failed,
            },
            "resync": progress_json(&progress),
            "driver": driver_json(&stats),
            "link": link_json(&link),
        });
        if let (Some(extra), Some(obj)) = (control.status_json(), status.as_object_mut()) {
            obj.insert("control".into(), extra);
        }
        status
    }
}

fn role_name(role: Option<Role>) -> &'static str {
    match role {
        Some(Role::InSync) => "in-sync",
        Some(Role::Survivor) => "survivor",
        Some(Role::Loser) => "loser",
        // The replica thread has not published its first stats yet.
        None => "starting",
    }
}

fn progress_json(p: &Progress) -> Value {
    json!({
        "active": p.active,
        "blocks_left": p.blocks_left,
        "rate_blocks_per_s": (p.rate_blocks_per_s * 10.0).round() / 10.0,
        "eta_s": p.eta_s.map(|s| s.round() as u64),
    })
}

fn driver_json(s: &DriverStats) -> Value {
    let c = &s.replica;
    json!({
        "frames_queued": s.frames_queued,
        "frames_dropped_link_down": s.frames_dropped_link_down,
        "frames_dropped_queue_full": s.frames_dropped_queue_full,
        "batches": s.batches,
        "regions_cleared": s.regions_cleared,
        "unreadable_blocks": s.unreadable_blocks,
        "resync_complete_epoch": s.resync_complete_epoch,
        "replica": {
            "frames_foreign": c.frames_foreign,
            "mutations_fenced": c.mutations_fenced,
            "mutations_from_future": c.mutations_from_future,
            "writes_nacked": c.writes_nacked,
            "writes_acked_alone": c.writes_acked_alone,
            "writes_retransmitted": c.writes_retransmitted,
            "resync_blocks_sent": c.resync_blocks_sent,
            "resync_blocks_applied": c.resync_blocks_applied,
            "divergent_blocks_saved": c.divergent_blocks_saved,
            "rtt_samples": c.rtt_samples,
            "blocks_settled": c.blocks_settled,
            "settle_requests_sent": c.settle_requests_sent,
            "flushes_done": c.flushes_done,
            "durable_acks_sent": c.durable_acks_sent,
            "blocks_repaired": c.blocks_repaired,
            "repair_requests_sent": c.repair_requests_sent,
            "repairs_failed": c.repairs_failed,
            "repair_refusals_sent": c.repair_refusals_sent,
            "reads_failed_unreadable": c.reads_failed_unreadable,
            "copies_withheld_unreadable": c.copies_withheld_unreadable,
        },
    })
}

fn link_json(s: &LinkStats) -> Value {
    let r = &s.rejects;
    json!({
        "sessions": s.sessions,
        "frames_in": s.frames_in,
        "frames_out": s.frames_out,
        "bytes_in": s.bytes_in,
        "bytes_out": s.bytes_out,
        "dial_failures": s.dial_failures,
        "control_dropped": s.control_dropped,
        "rejects": {
            "truncated": r.truncated,
            "bad_magic": r.bad_magic,
            "bad_version": r.bad_version,
            "bad_header_checksum": r.bad_header_checksum,
            "bad_body_checksum": r.bad_body_checksum,
            "wrong_cluster": r.wrong_cluster,
            "unknown_kind": r.unknown_kind,
            "too_long": r.too_long,
            "bad_length": r.bad_length,
            "reserved_not_zero": r.reserved_not_zero,
        },
    })
}

/// Lowercase hex of a stamp's 16 bytes.
pub(crate) fn stamp_hex(stamp: &Stamp) -> String {
    stamp.0.iter().map(|b| format!("{b:02x}")).collect()
}

/// One block as `GET /v1/blocks` reports it.
struct BlockReport {
    lba: u64,
    stamp: Stamp,
    /// None: the block failed its checksum.
    crc32: Option<u32>,
}

/// Reads `[lba, lba + count)` with stamps, reporting blocks that fail their checksum as
/// unreadable instead of failing the whole range.
async fn read_blocks(
    volume: &Volume,
    lba: u64,
    count: u64,
) -> Result<Vec<BlockReport>, BlockError> {
    let mut reports: Vec<Option<BlockReport>> = (0..count).map(|_| None).collect();
    let mut ranges = vec![(lba, count)];
    // Each failed read marks one more block unreadable and splits its range in two, so
    // `2 * count + 1` reads always suffice.
    let mut reads_left = 2 * count + 1;
    while let Some((start, n)) = ranges.pop() {
        if n == 0 {
            continue;
        }
        if reads_left == 0 {
            return Err(BlockError::Io(std::io::Error::other(
                "too many failed reads while isolating unreadable blocks",
            )));
        }
        reads_left -= 1;
        let len = u32::try_from(n * BLOCK_BYTES).map_err(|_| BlockError::TooLarge {
            len: n * BLOCK_BYTES,
            max: u64::from(u32::MAX),
        })?;
        match volume.read_with_stamps(start * BLOCK_BYTES, len).await {
            Ok((data, stamps)) => {
                for (i, (block, stamp)) in data.chunks(BLOCK_SIZE as usize).zip(stamps).enumerate()
                {
                    let at = start + i as u64;
                    reports[(at - lba) as usize] = Some(BlockReport {
                        lba: at,
                        stamp,
                        crc32: Some(crc32fast::hash(block)),
                    });
                }
            }
            Err(BlockError::Checksum { lba: bad }) if (start..start + n).contains(&bad) => {
                let stamp = volume.block_stamp(bad).await?;
                reports[(bad - lba) as usize] = Some(BlockReport {
                    lba: bad,
                    stamp,
                    crc32: None,
                });
                ranges.push((start, bad - start));
                ranges.push((bad + 1, start + n - bad - 1));
            }
            Err(e) => return Err(e),
        }
    }
    reports
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            r.ok_or_else(|| {
                BlockError::Io(std::io::Error::other(format!(
                    "block {} was not read",
                    lba + i as u64
                )))
            })
        })
        .collect()
}

fn parse_u64_param(req: &Request, key: &str) -> Result<u64, Response> {
    let text = req
        .query_param(key)
        .ok_or_else(|| Response::error(400, format!("missing query parameter {key}")))?;
    text.parse().map_err(|_| {
        Response::error(
            400,
            format!("query parameter {key}={text:?} is not a non-negative integer"),
        )
    })
}

async fn blocks(state: &AdminState, req: &Request) -> Result<Response, Response> {
    let lba = parse_u64_param(req, "lba")?;
    let count = parse_u64_param(req, "count")?;
    if count == 0 || count > BLOCKS_PER_CALL_MAX {
        return Err(Response::error(
            400,
            format!("count must be between 1 and {BLOCKS_PER_CALL_MAX}, not {count}"),
        ));
    }
    let blocks_total = state.device.size_bytes() / BLOCK_BYTES;
    if lba >= blocks_total || count > blocks_total - lba {
        return Err(Response::error(
            400,
            format!(
                "blocks {lba}..{} are beyond the volume's {blocks_total} blocks",
                lba.saturating_add(count)
            ),
        ));
    }
    let volume = state.device.volume();
    let reports = read_blocks(volume, lba, count)
        .await
        .map_err(|e| Response::error(500, format!("read blocks {lba}+{count}: {e}")))?;
    // The engine's dirty map is kept a superset of the replica's dirty blocks, at 1 MiB
    // region granularity and cleared lazily; when the replica reports no dirty block at all,
    // nothing may differ and a stale region mark is ignored.
    let any_dirty = state.device.driver_stats().dirty_blocks > 0;
    let list: Vec<Value> = reports
        .iter()
        .map(|r| {
            let dirty = any_dirty && volume.is_region_dirty(volume.region_of(r.lba * BLOCK_BYTES));
            json!({
                "lba": r.lba,
                "state": if r.crc32.is_some() { "ok" } else { "unreadable" },
                "crc32": r.crc32,
                "stamp": stamp_hex(&r.stamp),
                "dirty": dirty,
            })
        })
        .collect();
    Ok(Response::json(
        200,
        json!({
            "api_version": API_VERSION,
            "site": state.site_name,
            "volume": state.volume_name,
            "lba": lba,
            "count": count,
            "blocks": list,
        }),
    ))
}

/// `POST /v1/detach {"survivor": "a"|"b"}`: an operator's detach (DESIGN §4 "Peer loss").
async fn detach(state: &AdminState, req: &Request) -> Result<Response, Response> {
    let body: Value = serde_json::from_slice(&req.body)
        .map_err(|e| Response::error(400, format!("body is not JSON: {e}")))?;
    let survivor = match body["survivor"].as_str() {
        Some(s @ ("a" | "b")) => s,
        _ => return Err(Response::error(400, "give {\"survivor\": \"a\" | \"b\"}")),
    };
    match state.control().detach(survivor).await {
        Ok(outcome) => Ok(Response::json(
            200,
            json!({"api_version": API_VERSION, "survivor": survivor, "outcome": outcome}),
        )),
        Err(message) => Err(Response::error(409, message)),
    }
}

/// `POST /v1/policy {"policy": "sync"|"sync-received"|"async"|"adaptive", "active_site":
/// "a"|"b"}` (either key may be left out): the volume's ack policy and async writer (DESIGN
/// §5). With a witness it is committed in the cluster map and reaches both sites; without
/// one, only this site is told (the operator tells both).
async fn set_policy(state: &AdminState, req: &Request) -> Result<Response, Response> {
    let body: Value = serde_json::from_slice(&req.body)
        .map_err(|e| Response::error(400, format!("body is not JSON: {e}")))?;
    let ack = match body.get("policy") {
        None | Some(Value::Null) => None,
        Some(v) => Some(v.as_str().and_then(AckPolicy::parse).ok_or_else(|| {
            Response::error(
                400,
                "policy must be one of sync, sync-received, async, adaptive",
            )
        })?),
    };
    let active_site = match body.get("active_site") {
        None | Some(Value::Null) => None,
        Some(v) => Some(match v.as_str() {
            Some("a") => 0u8,
            Some("b") => 1u8,
            _ => return Err(Response::error(400, "active_site must be \"a\" or \"b\"")),
        }),
    };
    if ack.is_none() && active_site.is_none() {
        return Err(Response::error(
            400,
            "give \"policy\" and/or \"active_site\"",
        ));
    }
    let control = state.control();
    let outcome = if control.has_map() {
        control
            .set_policy(ack, active_site)
            .await
            .map_err(|m| Response::error(409, m))?
    } else {
        let mut policy = state.device.driver_stats().policy;
        if let Some(ack) = ack {
            policy.ack = ack;
        }
        if let Some(site) = active_site {
            policy.active_site = site;
        }
        state
            .device
            .control(stretch_replicator::core::Event::SetPolicy(policy))
            .await
            .map_err(|e| Response::error(503, format!("the replica did not take it: {e}")))?;
        "set at this site only (no witness): set the other site too".to_string()
    };
    Ok(Response::json(
        200,
        json!({"api_version": API_VERSION, "outcome": outcome}),
    ))
}

/// The blocks a repair body names: `lbas` and `ranges` together, each at most
/// [`REPAIR_BLOCKS_PER_CALL_MAX`] in all, within the volume.
fn repair_lbas(body: &Value, blocks_total: u64) -> Result<Vec<u64>, String> {
    let mut lbas = std::collections::BTreeSet::new();
    let too_many = || format!("name at most {REPAIR_BLOCKS_PER_CALL_MAX} blocks per call");
    let in_volume = |lba: u64| {
        if lba < blocks_total {
            Ok(lba)
        } else {
            Err(format!(
                "block {lba} is beyond the volume's {blocks_total} blocks"
            ))
        }
    };
    if let Some(list) = body.get("lbas") {
        let list = list
            .as_array()
            .ok_or("lbas must be an array of block numbers")?;
        if list.len() as u64 > REPAIR_BLOCKS_PER_CALL_MAX {
            return Err(too_many());
        }
        for v in list {
            let lba = v.as_u64().ok_or("lbas must be non-negative integers")?;
            lbas.insert(in_volume(lba)?);
        }
    }
    if let Some(ranges) = body.get("ranges") {
        let ranges = ranges
            .as_array()
            .ok_or("ranges must be an array of [first, count] pairs")?;
        for r in ranges {
            let pair = r.as_array().filter(|p| p.len() == 2);
            let (Some(first), Some(count)) = (
                pair.and_then(|p| p[0].as_u64()),
                pair.and_then(|p| p[1].as_u64()),
            ) else {
                return Err("ranges must be an array of [first, count] pairs".into());
            };
            if count > REPAIR_BLOCKS_PER_CALL_MAX
                || lbas.len() as u64 + count > REPAIR_BLOCKS_PER_CALL_MAX
            {
                return Err(too_many());
            }
            if count > 0 {
                in_volume(first.saturating_add(count - 1))?;
            }
            lbas.extend(first..first + count);
        }
    }
    if lbas.len() as u64 > REPAIR_BLOCKS_PER_CALL_MAX {
        return Err(too_many());
    }
    if lbas.is_empty() {
        return Err("name the blocks to repair: {\"lbas\": [N, ...]} or {\"ranges\": [[FIRST, COUNT], ...]}".into());
    }
    Ok(lbas.into_iter().collect())
}

/// `POST /v1/repair`: see the module documentation.
async fn repair(state: &AdminState, req: &Request) -> Result<Response, Response> {
    let body: Value = serde_json::from_slice(&req.body)
        .map_err(|e| Response::error(400, format!("body is not JSON: {e}")))?;
    let blocks_total = state.device.size_bytes() / BLOCK_BYTES;
    let lbas = repair_lbas(&body, blocks_total).map_err(|m| Response::error(400, m))?;
    let force = match body.get("force") {
        None => false,
        Some(v) => v
            .as_bool()
            .ok_or_else(|| Response::error(400, "force must be true or false"))?,
    };
    let stats = state.device.driver_stats();
    if stats.role != Some(Role::InSync) || !stats.link_up {
        return Err(Response::error(
            409,
            format!(
                "site {} is {} with the link {}: repair takes data only from a peer in sync at the current epoch",
                state.site_name,
                role_name(stats.role),
                if stats.link_up { "up" } else { "down" }
            ),
        ));
    }
    match state.device.repair_blocks(&lbas, force).await {
        // Each block now holds the version the repair rule keeps: the peer's, or its own if
        // that was as new (`replication.blocks_repaired` in the status counts replacements).
        Ok(()) => Ok(Response::json(
            200,
            json!({
                "api_version": API_VERSION,
                "site": state.site_name,
                "blocks": lbas.len(),
                "force": force,
            }),
        )),
        Err(e) => Err(Response::error(
            409,
            format!("repair at site {}: {e}", state.site_name),
        )),
    }
}

/// `POST /v1/force-survivor {"accept_data_loss": bool}` (DESIGN §6, the double failure).
async fn force_survivor(state: &AdminState, req: &Request) -> Result<Response, Response> {
    let body: Value = serde_json::from_slice(&req.body)
        .map_err(|e| Response::error(400, format!("body is not JSON: {e}")))?;
    let accept = body["accept_data_loss"].as_bool().unwrap_or(false);
    match state.control().force_survivor(accept).await {
        Ok(outcome) => Ok(Response::json(
            200,
            json!({
                "api_version": API_VERSION,
                "site": state.site_name,
                "acted": outcome.acted,
                "report": outcome.report,
            }),
        )),
        Err(message) => Err(Response::error(409, message)),
    }
}

/// `POST /v1/readmit {"witness": "ADDR", "peer": "ADDR"}` (either may be absent).
async fn readmit(state: &AdminState, req: &Request) -> Result<Response, Response> {
    let body: Value = serde_json::from_slice(&req.body)
        .map_err(|e| Response::error(400, format!("body is not JSON: {e}")))?;
    let addr = |key: &str| -> Result<Option<SocketAddr>, Response> {
        match &body[key] {
            Value::Null => Ok(None),
            Value::String(text) => text.parse().map(Some).map_err(|_| {
                Response::error(
                    400,
                    format!("{key}: {text:?} is not an address (HOST:PORT)"),
                )
            }),
            other => Err(Response::error(
                400,
                format!("{key}: {other} is not a string"),
            )),
        }
    };
    let (witness, peer) = (addr("witness")?, addr("peer")?);
    match state.control().readmit(witness, peer).await {
        Ok(outcome) => Ok(Response::json(
            200,
            json!({"api_version": API_VERSION, "outcome": outcome}),
        )),
        Err(message) => Err(Response::error(409, message)),
    }
}

async fn route(state: Arc<AdminState>, req: Request) -> Response {
    let path = req.path().trim_end_matches('/');
    let result = match (req.method.as_str(), path) {
        ("GET", "/v1/status") => Ok(Response::json(200, state.status_json())),
        ("GET", "/v1/blocks") => blocks(&state, &req).await,
        ("POST", "/v1/detach") => detach(&state, &req).await,
        ("POST", "/v1/policy") => set_policy(&state, &req).await,
        ("POST", "/v1/repair") => repair(&state, &req).await,
        ("POST", "/v1/force-survivor") => force_survivor(&state, &req).await,
        ("POST", "/v1/readmit") => readmit(&state, &req).await,
        (
            _,
            "/v1/status" | "/v1/blocks" | "/v1/detach" | "/v1/policy" | "/v1/repair"
            | "/v1/force-survivor" | "/v1/readmit",
        ) => Err(Response::error(
            405,
            format!("{} is not allowed on {path}", req.method),
        )),
        _ => Err(Response::error(404, format!("no route {path}"))),
    };
    result.unwrap_or_else(|e| e)
}

/// The running admin API; it stops when dropped.
pub(crate) struct AdminServer {
    server: HttpServer,
    /// The control plane attaches its [`ControlView`] through this.
    pub(crate) state: Arc<AdminState>,
}

impl AdminServer {
    pub(crate) async fn start(addr: SocketAddr, state: AdminState) -> anyhow::Result<AdminServer> {
        let state = Arc::new(state);
        let routed = state.clone();
        let server = HttpServer::start(
            &addr.to_string(),
            handler(move |req| route(routed.clone(), req)),
        )
        .await
        .map_err(|e| anyhow::anyhow!("listen for the admin API on {addr}: {e}"))?;
        Ok(AdminServer { server, state })
    }

    pub(crate) fn addr(&self) -> SocketAddr {
        self.server.addr()
    }
}
