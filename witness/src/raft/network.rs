//! Raft RPCs over TCP: one postcard-encoded, framed (`len | crc32 | payload`) request and reply
//! at a time per connection, every step under a deadline, every frame under
//! `FRAME_BYTES_MAX`, and at most `CONNECTIONS_MAX` connections served at once.
//!
//! Every request travels in an [`Envelope`] naming the sender's generation; a node answers a
//! request of another generation with `WrongGeneration` and does nothing else, so after a
//! `force-survivor` the abandoned group's votes and entries (higher terms included) never
//! reach the new group's Raft, and the new group's never reach a node not yet reset.
//!
//! A node may dial some members at another address than the one in the membership
//! (`PeerAddrs`): in a stretched cluster the sites' Raft traffic to each other crosses the
//! inter-site link, while the witness reaches each site directly.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::BasicNode;
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::timeout;

use super::state_machine::MapStateMachine;
use super::{frame, unframe, Member, NodeId, Raft, TypeConfig, FRAME_BYTES_MAX};
use crate::map::{ApplyResult, ClusterMap, Command};
use openraft::error::ClientWriteError;

/// Connections a node serves at once; more are closed at accept. Three voters need a handful.
pub const CONNECTIONS_MAX: usize = 64;
/// A served connection idle this long is closed.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Pause after a failed accept.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// Deadline for writing one reply.
const REPLY_DEADLINE: Duration = Duration::from_secs(5);

/// What travels on the wire: the request and its sender's generation.
#[derive(Debug, Serialize, Deserialize)]
pub struct Envelope {
    pub generation: u64,
    pub req: RpcRequest,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum RpcRequest {
    AppendEntries(AppendEntriesRequest<TypeConfig>),
    Vote(VoteRequest<NodeId>),
    InstallSnapshot(InstallSnapshotRequest<TypeConfig>),
    /// A proposal forwarded by a node that is not the leader (sites propose detaches and
    /// rejoins wherever the leader is).
    ClientWrite(Command),
    /// A linearizable read of the map, forwarded to the leader.
    ReadMap,
    /// A `ClientWrite` or `ReadMap` for the serving node to pass to the leader it knows (one
    /// hop, never relayed again): a site cut off from the leader (the other site, across the
    /// cut link) still reaches it through the witness.
    Relay(Box<RpcRequest>),
}

#[derive(Debug, Serialize, Deserialize)]
pub enum RpcResponse {
    AppendEntries(AppendEntriesResponse<NodeId>),
    Vote(VoteResponse<NodeId>),
    InstallSnapshot(InstallSnapshotResponse<NodeId>),
    ClientWrite(ApplyResult),
    /// The map after a ReadIndex, with the log index it reflects.
    Map {
        index: u64,
        map: ClusterMap,
    },
    /// The serving node is not the leader (a forwarded request does not hop twice).
    NotLeader(Option<NodeId>),
    /// The serving node's Raft refused (it is shutting down, or a snapshot error).
    Error(String),
    /// The serving node is of another generation; the request was not looked at.
    WrongGeneration {
        generation: u64,
    },
}

/// Addresses this node dials some members at instead of their membership address.
pub type PeerAddrs = BTreeMap<Member, String>;

/// The address to dial `target` at: an override for its member, else its membership address.
pub(crate) fn dial_addr(overrides: &PeerAddrs, target: NodeId, membership_addr: &str) -> String {
    Member::of(target)
        .and_then(|m| overrides.get(&m).cloned())
        .unwrap_or_else(|| membership_addr.to_string())
}

fn io_err(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

async fn write_frame(stream: &mut TcpStream, payload: &[u8]) -> io::Result<()> {
    stream.write_all(&frame(payload)?).await
}

/// Reads one frame; `None` on a clean end of stream before a frame starts.
async fn read_frame(stream: &mut TcpStream) -> io::Result<Option<Vec<u8>>> {
    let mut header = [0u8; 8];
    match stream.read_exact(&mut header).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
    // Checked before allocating: a peer cannot make us reserve more than the limit.
    if len > FRAME_BYTES_MAX {
        return Err(io_err(format!("frame of {len} bytes exceeds the limit")));
    }
    let mut buf = vec![0u8; 8 + len];
    buf[..8].copy_from_slice(&header);
    stream.read_exact(&mut buf[8..]).await?;
    match unframe(&buf).map_err(io_err)? {
        Some((payload, _)) => Ok(Some(payload.to_vec())),
        None => Err(io_err("short frame")),
    }
}

/// Builds clients to the other voters, for a node of `generation`.
#[derive(Debug, Clone, Default)]
pub struct TcpNetworkFactory {
    pub generation: u64,
    pub peer_addrs: PeerAddrs,
}

impl RaftNetworkFactory<TypeConfig> for TcpNetworkFactory {
    type Network = TcpClient;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> TcpClient {
        TcpClient {
            target,
            addr: dial_addr(&self.peer_addrs, target, &node.addr),
            generation: self.generation,
            conn: None,
        }
    }
}

/// A client to one voter; keeps its connection until an error or deadline drops it.
pub struct TcpClient {
    target: NodeId,
    addr: String,
    generation: u64,
    conn: Option<TcpStream>,
}

enum CallError {
    Unreachable(io::Error),
    Network(io::Error),
}

impl TcpClient {
    async fn call(
        &mut self,
        req: RpcRequest,
        deadline: Duration,
    ) -> Result<RpcResponse, CallError> {
        let envelope = Envelope {
            generation: self.generation,
            req,
        };
        let bytes = postcard::to_stdvec(&envelope).map_err(|e| CallError::Network(io_err(e)))?;
        let exchange = async {
            let mut stream = match self.conn.take() {
                Some(s) => s,
                None => {
                    let s = TcpStream::connect(&self.addr)
                        .await
                        .map_err(CallError::Unreachable)?;
                    s.set_nodelay(true).map_err(CallError::Network)?;
                    s
                }
            };
            write_frame(&mut stream, &bytes)
                .await
                .map_err(CallError::Network)?;
            let reply = read_frame(&mut stream)
                .await
                .map_err(CallError::Network)?
                .ok_or_else(|| CallError::Network(io_err("connection closed before the reply")))?;
            let resp: RpcResponse =
                postcard::from_bytes(&reply).map_err(|e| CallError::Network(io_err(e)))?;
            self.conn = Some(stream);
            Ok(resp)
        };
        match timeout(deadline, exchange).await {
            Ok(r) => r,
            Err(_) => Err(CallError::Network(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("rpc to node {} timed out", self.target),
            ))),
        }
    }
}

fn to_rpc_error<E: std::error::Error>(e: CallError) -> RPCError<NodeId, BasicNode, E> {
    match e {
        CallError::Unreachable(e) => RPCError::Unreachable(Unreachable::new(&e)),
        CallError::Network(e) => RPCError::Network(NetworkError::new(&e)),
    }
}

fn unexpected<E: std::error::Error>(resp: RpcResponse) -> RPCError<NodeId, BasicNode, E> {
    let msg = match resp {
        RpcResponse::Error(m) => m,
        RpcResponse::WrongGeneration { generation } => {
            format!("the node is of generation {generation}: refused")
        }
        other => format!("unexpected reply {other:?}"),
    };
    RPCError::Network(NetworkError::new(&io_err(msg)))
}

impl RaftNetwork<TypeConfig> for TcpClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        match self
            .call(RpcRequest::AppendEntries(rpc), option.hard_ttl())
            .await
        {
            Ok(RpcResponse::AppendEntries(r)) => Ok(r),
            Ok(other) => Err(unexpected(other)),
            Err(e) => Err(to_rpc_error(e)),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>,
    > {
        match self
            .call(RpcRequest::InstallSnapshot(rpc), option.hard_ttl())
            .await
        {
            Ok(RpcResponse::InstallSnapshot(r)) => Ok(r),
            Ok(other) => Err(unexpected(other)),
            Err(e) => Err(to_rpc_error(e)),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        match self.call(RpcRequest::Vote(rpc), option.hard_ttl()).await {
            Ok(RpcResponse::Vote(r)) => Ok(r),
            Ok(other) => Err(unexpected(other)),
            Err(e) => Err(to_rpc_error(e)),
        }
    }
}

/// One forwarded request from a node of `generation` to the node at `addr`, on a fresh
/// connection, under `deadline`.
pub(crate) async fn forward(
    generation: u64,
    target: NodeId,
    addr: &str,
    req: RpcRequest,
    deadline: Duration,
) -> io::Result<RpcResponse> {
    let mut client = TcpClient {
        target,
        addr: addr.to_string(),
        generation,
        conn: None,
    };
    client.call(req, deadline).await.map_err(|e| match e {
        CallError::Unreachable(e) | CallError::Network(e) => e,
    })
}

/// Deadline of one relayed request's hop to the leader.
const RELAY_DEADLINE: Duration = Duration::from_secs(2);

/// What a serving node needs besides its Raft: its generation, and how it dials the leader
/// when it relays.
#[derive(Clone)]
pub(crate) struct ServeContext {
    pub(crate) generation: u64,
    pub(crate) peer_addrs: PeerAddrs,
}

/// Serves Raft RPCs of `ctx.generation` from the other voters until the task is aborted.
pub(crate) async fn serve(
    listener: TcpListener,
    raft: Raft,
    sm: MapStateMachine,
    ctx: ServeContext,
) {
    let limit = Arc::new(Semaphore::new(CONNECTIONS_MAX));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            // Out of descriptors or a connection reset before accept: the listener is still
            // good, so back off briefly instead of ending the server.
            Err(e) => {
                tracing::warn!(error = %e, "raft accept failed");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "raft connection limit reached; closing");
            continue;
        };
        let raft = raft.clone();
        let sm = sm.clone();
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let _permit = permit;
            if let Err(e) = serve_connection(stream, raft, sm, ctx).await {
                tracing::debug!(%peer, error = %e, "raft connection closed");
            }
        });
    }
}

async fn serve_connection(
    mut stream: TcpStream,
    raft: Raft,
    sm: MapStateMachine,
    ctx: ServeContext,
) -> io::Result<()> {
    let generation = ctx.generation;
    stream.set_nodelay(true)?;
    loop {
        let payload = match timeout(IDLE_TIMEOUT, read_frame(&mut stream)).await {
            Err(_) | Ok(Ok(None)) => return Ok(()),
            Ok(Err(e)) => return Err(e),
            Ok(Ok(Some(p))) => p,
        };
        // A request that does not decode ends this connection only; the node serves on.
        let envelope: Envelope = postcard::from_bytes(&payload).map_err(io_err)?;
        if envelope.generation != generation {
            // Another generation's node: its votes and entries must never touch this group.
            tracing::debug!(
                theirs = envelope.generation,
                ours = generation,
                "refusing a raft request of another generation"
            );
            let resp = RpcResponse::WrongGeneration { generation };
            let bytes = postcard::to_stdvec(&resp).map_err(io_err)?;
            timeout(REPLY_DEADLINE, write_frame(&mut stream, &bytes))
                .await
                .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "reply deadline"))??;
            continue;
        }
        let resp = match envelope.req {
            RpcRequest::Relay(inner) => relay(&raft, &sm, &ctx, *inner).await,
            other => handle(&raft, &sm, other).await,
        };
        let bytes = postcard::to_stdvec(&resp).map_err(io_err)?;
        timeout(REPLY_DEADLINE, write_frame(&mut stream, &bytes))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "reply deadline"))??;
    }
}

/// A relayed request: handled here if this node leads, else passed once to the leader.
async fn relay(
    raft: &Raft,
    sm: &MapStateMachine,
    ctx: &ServeContext,
    req: RpcRequest,
) -> RpcResponse {
    if !matches!(req, RpcRequest::ClientWrite(_) | RpcRequest::ReadMap) {
        return RpcResponse::Error("only proposals and map reads are relayed".into());
    }
    let (me, leader, addr) = {
        let m = raft.metrics();
        let m = m.borrow();
        let leader = m.current_leader;
        let addr = leader.and_then(|l| {
            m.membership_config
                .membership()
                .get_node(&l)
                .map(|n| dial_addr(&ctx.peer_addrs, l, &n.addr))
        });
        (m.id, leader, addr)
    };
    match (leader, addr) {
        (Some(l), _) if l == me => handle(raft, sm, req).await,
        (Some(l), Some(addr)) => match forward(ctx.generation, l, &addr, req, RELAY_DEADLINE).await
        {
            Ok(resp) => resp,
            Err(e) => RpcResponse::Error(format!("relay to the leader {l} at {addr}: {e}")),
        },
        (leader, _) => RpcResponse::NotLeader(leader),
    }
}

/// One request for this node's Raft.
async fn handle(raft: &Raft, sm: &MapStateMachine, req: RpcRequest) -> RpcResponse {
    match req {
        RpcRequest::Relay(_) => RpcResponse::Error("a relayed request is not relayed again".into()),
        RpcRequest::AppendEntries(r) => match raft.append_entries(r).await {
            Ok(r) => RpcResponse::AppendEntries(r),
            Err(e) => RpcResponse::Error(e.to_string()),
        },
        RpcRequest::Vote(r) => match raft.vote(r).await {
            Ok(r) => RpcResponse::Vote(r),
            Err(e) => RpcResponse::Error(e.to_string()),
        },
        RpcRequest::InstallSnapshot(r) => match raft.install_snapshot(r).await {
            Ok(r) => RpcResponse::InstallSnapshot(r),
            Err(e) => RpcResponse::Error(e.to_string()),
        },
        RpcRequest::ClientWrite(cmd) => match raft.client_write(cmd).await {
            Ok(r) => RpcResponse::ClientWrite(r.data),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                RpcResponse::NotLeader(f.leader_id)
            }
            Err(e) => RpcResponse::Error(e.to_string()),
        },
        RpcRequest::ReadMap => match raft.ensure_linearizable().await {
            Ok(_) => {
                let (index, map) = sm.indexed_map();
                RpcResponse::Map { index, map }
            }
            Err(e) => match e.forward_to_leader() {
                Some(f) => RpcResponse::NotLeader(f.leader_id),
                None => RpcResponse::Error(e.to_string()),
            },
        },
    }
}
