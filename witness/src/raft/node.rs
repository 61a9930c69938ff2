//! One voter of the witness group: storage, state machine, network server and the Raft
//! instance, started from a data directory.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{ClientWriteError, RaftError};
use openraft::{BasicNode, Config, SnapshotPolicy};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use super::log_store::FileLogStore;
use super::network::{
    dial_addr, forward, serve, PeerAddrs, RpcRequest, RpcResponse, ServeContext, TcpNetworkFactory,
};
use super::state_machine::MapStateMachine;
use super::{generation_of, NodeId, Raft};
use crate::map::{ApplyResult, ClusterMap, Command};

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("storage: {0}")]
    Io(#[from] std::io::Error),
    #[error("raft config: {0}")]
    Config(String),
    #[error("raft: {0}")]
    Raft(String),
    /// Proposals and linearizable reads go to the leader; this node is not it.
    #[error("not the leader; the leader is {leader:?}")]
    NotLeader { leader: Option<NodeId> },
}

/// Raft timing for the witness group: fast enough that an election fits well inside the
/// arbitration budget (DESIGN §6: election + preference delay + L·(1+ρ) + δ).
pub fn raft_config() -> Result<Config, NodeError> {
    let cfg = Config {
        cluster_name: "stretch-witness".into(),
        heartbeat_interval: 100,
        election_timeout_min: 400,
        election_timeout_max: 800,
        snapshot_policy: SnapshotPolicy::LogsSinceLast(1_000),
        max_in_snapshot_log_to_keep: 100,
        ..Config::default()
    };
    cfg.validate().map_err(|e| NodeError::Config(e.to_string()))
}

pub struct WitnessNode {
    pub id: NodeId,
    /// The group's generation, from `id`: RPCs of any other generation are refused.
    pub generation: u64,
    pub addr: SocketAddr,
    pub raft: Raft,
    sm: MapStateMachine,
    /// Taken by the first `stop`, which waits for it to end so the listener is closed.
    server: std::sync::Mutex<Option<JoinHandle<()>>>,
    peer_addrs: PeerAddrs,
}

impl WitnessNode {
    /// Starts voter `id` with its durable state in `dir`, serving RPCs on `listener`.
    pub async fn start(
        id: NodeId,
        dir: &Path,
        listener: TcpListener,
    ) -> Result<WitnessNode, NodeError> {
        WitnessNode::start_with(id, dir, listener, PeerAddrs::new()).await
    }

    /// Like `start`, dialing the members in `peer_addrs` at those addresses instead of their
    /// membership addresses (a site reaches the other site's voter across the inter-site link).
    pub async fn start_with(
        id: NodeId,
        dir: &Path,
        listener: TcpListener,
        peer_addrs: PeerAddrs,
    ) -> Result<WitnessNode, NodeError> {
        let addr = listener.local_addr()?;
        let generation = generation_of(id);
        let log = FileLogStore::open(dir)?;
        let sm = MapStateMachine::open(dir)?;
        let network = TcpNetworkFactory {
            generation,
            peer_addrs: peer_addrs.clone(),
        };
        let raft = Raft::new(id, Arc::new(raft_config()?), network, log, sm.clone())
            .await
            .map_err(|e| NodeError::Raft(e.to_string()))?;
        let server_raft = raft.clone();
        let ctx = ServeContext {
            generation,
            peer_addrs: peer_addrs.clone(),
        };
        let server = tokio::spawn(serve(listener, server_raft, sm.clone(), ctx));
        Ok(WitnessNode {
            id,
            generation,
            addr,
            raft,
            sm,
            server: std::sync::Mutex::new(Some(server)),
            peer_addrs,
        })
    }

    /// One-time bootstrap of the group (A = 1, B = 2, W = 3 with their addresses). Run on one
    /// node of a fresh cluster; a node whose log is not empty refuses it.
    pub async fn bootstrap(&self, members: BTreeMap<NodeId, BasicNode>) -> Result<(), NodeError> {
        self.raft
            .initialize(members)
            .await
            .map_err(|e| NodeError::Raft(e.to_string()))
    }

    /// Proposes a command; returns the state machine's result once committed and applied.
    pub async fn propose(&self, cmd: Command) -> Result<ApplyResult, NodeError> {
        match self.raft.client_write(cmd).await {
            Ok(resp) => Ok(resp.data),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                Err(NodeError::NotLeader {
                    leader: f.leader_id,
                })
            }
            Err(e) => Err(NodeError::Raft(e.to_string())),
        }
    }

    /// A linearizable read of the map (ReadIndex on the leader; DESIGN §6 "at start, a site
    /// serves nothing before a ReadIndex read of the map").
    pub async fn read_map(&self) -> Result<ClusterMap, NodeError> {
        match self.raft.ensure_linearizable().await {
            Ok(_) => Ok(self.sm.map()),
            Err(e) => match e.forward_to_leader() {
                Some(f) => Err(NodeError::NotLeader {
                    leader: f.leader_id,
                }),
                None => Err(NodeError::Raft(e.to_string())),
            },
        }
    }

    /// The map as applied on this node so far (may lag the leader).
    pub fn local_map(&self) -> ClusterMap {
        self.sm.map()
    }

    /// The log index this node has applied up to (no copy of the map).
    pub fn local_applied_index(&self) -> u64 {
        self.sm.applied_index()
    }

    /// The applied map with the log index it reflects.
    pub fn local_indexed_map(&self) -> (u64, ClusterMap) {
        self.sm.indexed_map()
    }

    /// The leader this node knows of, and the current term.
    pub fn leader(&self) -> (Option<NodeId>, u64) {
        let m = self.raft.metrics();
        let m = m.borrow();
        (m.current_leader, m.current_term)
    }

    fn leader_addr(&self, leader: NodeId) -> Option<String> {
        let m = self.raft.metrics();
        let m = m.borrow();
        m.membership_config
            .membership()
            .get_node(&leader)
            .map(|n| dial_addr(&self.peer_addrs, leader, &n.addr))
    }

    /// The current voters of the group (as this node knows the membership).
    pub fn voters(&self) -> Vec<NodeId> {
        let m = self.raft.metrics();
        let m = m.borrow();
        m.membership_config.membership().voter_ids().collect()
    }

    /// Adds `id` at `addr` as a learner and waits until it has caught up with the log, then
    /// makes the voters `voters` (the leader only). Bounded by `deadline` in all.
    pub async fn add_voters(
        &self,
        learners: BTreeMap<NodeId, BasicNode>,
        voters: std::collections::BTreeSet<NodeId>,
        deadline: Duration,
    ) -> Result<(), NodeError> {
        let work = async {
            for (id, node) in learners {
                self.raft
                    .add_learner(id, node, true)
                    .await
                    .map_err(|e| NodeError::Raft(format!("add node {id} as a learner: {e}")))?;
            }
            self.raft
                .change_membership(voters, false)
                .await
                .map_err(|e| NodeError::Raft(format!("change the voters: {e}")))?;
            Ok(())
        };
        tokio::time::timeout(deadline, work)
            .await
            .map_err(|_| NodeError::Raft("membership change timed out".into()))?
    }

    /// Stops the node: Raft and the RPC server, without needing to own it (tasks still
    /// holding it see errors). Returns once the listener is closed, so its address can be
    /// bound again at once. Its directory keeps its durable state.
    pub async fn stop(&self) {
        let server = self.server.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(server) = server {
            server.abort();
            // Cancelled at its next await: the listener it owns is dropped by then.
            let _ = server.await;
        }
        if let Err(e) = self.raft.shutdown().await {
            tracing::warn!(error = %e, "raft shutdown");
        }
    }

    /// Proposes `cmd` through whichever node leads: here, forwarded once to the leader, or
    /// relayed to it by another voter when the leader does not answer (see `direct_share`).
    pub async fn propose_anywhere(
        &self,
        cmd: Command,
        deadline: Duration,
    ) -> Result<ApplyResult, NodeError> {
        let leader = match tokio::time::timeout(deadline, self.propose(cmd.clone())).await {
            Err(_) => return Err(NodeError::Raft("proposal timed out".into())),
            Ok(Err(NodeError::NotLeader { leader })) if leader != Some(self.id) => leader,
            Ok(other) => return other,
        };
        let direct = match leader {
            Some(leader) => self
                .forward(
                    leader,
                    RpcRequest::ClientWrite(cmd.clone()),
                    direct_share(deadline),
                )
                .await
                .and_then(|r| match r {
                    RpcResponse::ClientWrite(result) => Ok(result),
                    other => Err(forward_error(other)),
                }),
            None => Err(NodeError::NotLeader { leader: None }),
        };
        match direct {
            Ok(result) => Ok(result),
            Err(e) => match self
                .relay(leader, RpcRequest::ClientWrite(cmd), deadline)
                .await
            {
                Some(RpcResponse::ClientWrite(result)) => Ok(result),
                _ => Err(e),
            },
        }
    }

    /// Asks each other voter (not `leader`) in turn to pass `req` to the leader it knows; the
    /// first answer that is not an error. A site that cannot reach the leader across a cut
    /// link, or does not know it while it campaigns, reaches it through the witness.
    async fn relay(
        &self,
        leader: Option<NodeId>,
        req: RpcRequest,
        deadline: Duration,
    ) -> Option<RpcResponse> {
        let others: Vec<(NodeId, String)> = {
            let m = self.raft.metrics();
            let m = m.borrow();
            let membership = m.membership_config.membership();
            membership
                .voter_ids()
                .filter(|id| *id != self.id && Some(*id) != leader)
                .filter_map(|id| {
                    membership
                        .get_node(&id)
                        .map(|n| (id, dial_addr(&self.peer_addrs, id, &n.addr)))
                })
                .collect()
        };
        let req = RpcRequest::Relay(Box::new(req));
        for (id, addr) in others {
            // Each voter is asked with its own deadline; the voters are few (two others).
            match forward(self.generation, id, &addr, req.clone(), deadline).await {
                Ok(RpcResponse::ClientWrite(r)) => return Some(RpcResponse::ClientWrite(r)),
                Ok(RpcResponse::Map { index, map }) => {
                    return Some(RpcResponse::Map { index, map })
                }
                _ => continue,
            }
        }
        None
    }

    /// A linearizable read of the map through whichever node leads, with its log index.
    pub async fn read_map_anywhere(
        &self,
        deadline: Duration,
    ) -> Result<(u64, ClusterMap), NodeError> {
        let leader = match tokio::time::timeout(deadline, self.raft.ensure_linearizable()).await {
            Err(_) => return Err(NodeError::Raft("read timed out".into())),
            Ok(Ok(_)) => return Ok(self.sm.indexed_map()),
            Ok(Err(e)) => match e.forward_to_leader() {
                Some(f) if f.leader_id != Some(self.id) => f.leader_id,
                Some(f) => {
                    return Err(NodeError::NotLeader {
                        leader: f.leader_id,
                    })
                }
                None => return Err(NodeError::Raft(e.to_string())),
            },
        };
        let direct = match leader {
            Some(leader) => self
                .forward(leader, RpcRequest::ReadMap, direct_share(deadline))
                .await
                .and_then(|r| match r {
                    RpcResponse::Map { index, map } => Ok((index, map)),
                    other => Err(forward_error(other)),
                }),
            None => Err(NodeError::NotLeader { leader: None }),
        };
        match direct {
            Ok(read) => Ok(read),
            Err(e) => match self.relay(leader, RpcRequest::ReadMap, deadline).await {
                Some(RpcResponse::Map { index, map }) => Ok((index, map)),
                _ => Err(e),
            },
        }
    }

    async fn forward(
        &self,
        leader: NodeId,
        req: RpcRequest,
        deadline: Duration,
    ) -> Result<RpcResponse, NodeError> {
        let Some(addr) = self.leader_addr(leader) else {
            return Err(NodeError::NotLeader {
                leader: Some(leader),
            });
        };
        forward(self.generation, leader, &addr, req, deadline)
            .await
            .map_err(|e| NodeError::Raft(format!("forward to node {leader} at {addr}: {e}")))
    }

    /// Stops the node: Raft and the RPC server. Its directory keeps its durable state.
    pub async fn shutdown(self) {
        self.stop().await;
    }
}

/// The part of a forwarded request's deadline spent on the leader directly, before the other
/// voters are asked to relay it. A healthy leader answers a forwarded proposal in one round
/// trip plus an fsync; a leader across a cut link never answers, and the preferred site's
/// detach must not wait the whole deadline for it. If a slow direct proposal commits after
/// all, the relayed copy is a duplicate, which is harmless: every command a site forwards is
/// a compare-and-set on the epoch or idempotent, and the proposer learns the outcome from
/// the map, not from the reply.
fn direct_share(deadline: Duration) -> Duration {
    (deadline / 4).max(Duration::from_millis(200)).min(deadline)
}

fn forward_error(resp: RpcResponse) -> NodeError {
    match resp {
        RpcResponse::NotLeader(leader) => NodeError::NotLeader { leader },
        RpcResponse::Error(e) => NodeError::Raft(e),
        RpcResponse::WrongGeneration { generation } => NodeError::Raft(format!(
            "the leader is of generation {generation}: this node was left behind by a force-survivor"
        )),
        other => NodeError::Raft(format!("unexpected reply {other:?}")),
    }
}
