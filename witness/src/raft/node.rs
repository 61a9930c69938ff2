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
use super::network::{forward, serve, RpcRequest, RpcResponse, TcpNetworkFactory};
use super::state_machine::MapStateMachine;
use super::{NodeId, Raft};
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
    pub addr: SocketAddr,
    pub raft: Raft,
    sm: MapStateMachine,
    server: JoinHandle<()>,
}

impl WitnessNode {
    /// Starts voter `id` with its durable state in `dir`, serving RPCs on `listener`.
    pub async fn start(
        id: NodeId,
        dir: &Path,
        listener: TcpListener,
    ) -> Result<WitnessNode, NodeError> {
        let addr = listener.local_addr()?;
        let log = FileLogStore::open(dir)?;
        let sm = MapStateMachine::open(dir)?;
        let raft = Raft::new(
            id,
            Arc::new(raft_config()?),
            TcpNetworkFactory,
            log,
            sm.clone(),
        )
        .await
        .map_err(|e| NodeError::Raft(e.to_string()))?;
        let server_raft = raft.clone();
        let server = tokio::spawn(serve(listener, server_raft, sm.clone()));
        Ok(WitnessNode {
            id,
            addr,
            raft,
            sm,
            server,
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
            .map(|n| n.addr.clone())
    }

    /// Proposes `cmd` through whichever node leads: here, or forwarded once to the leader.
    pub async fn propose_anywhere(
        &self,
        cmd: Command,
        deadline: Duration,
    ) -> Result<ApplyResult, NodeError> {
        let leader = match tokio::time::timeout(deadline, self.propose(cmd.clone())).await {
            Err(_) => return Err(NodeError::Raft("proposal timed out".into())),
            Ok(Err(NodeError::NotLeader {
                leader: Some(leader),
            })) if leader != self.id => leader,
            Ok(other) => return other,
        };
        match self
            .forward(leader, RpcRequest::ClientWrite(cmd), deadline)
            .await?
        {
            RpcResponse::ClientWrite(result) => Ok(result),
            other => Err(forward_error(other)),
        }
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
                Some(f) => match f.leader_id {
                    Some(leader) if leader != self.id => leader,
                    other => return Err(NodeError::NotLeader { leader: other }),
                },
                None => return Err(NodeError::Raft(e.to_string())),
            },
        };
        match self.forward(leader, RpcRequest::ReadMap, deadline).await? {
            RpcResponse::Map { index, map } => Ok((index, map)),
            other => Err(forward_error(other)),
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
        forward(leader, &addr, &req, deadline)
            .await
            .map_err(|e| NodeError::Raft(format!("forward to node {leader} at {addr}: {e}")))
    }

    /// Stops the node: Raft and the RPC server. Its directory keeps its durable state.
    pub async fn shutdown(self) {
        self.server.abort();
        if let Err(e) = self.raft.shutdown().await {
            tracing::warn!(error = %e, "raft shutdown");
        }
    }
}

fn forward_error(resp: RpcResponse) -> NodeError {
    match resp {
        RpcResponse::NotLeader(leader) => NodeError::NotLeader { leader },
        RpcResponse::Error(e) => NodeError::Raft(e),
        other => NodeError::Raft(format!("unexpected reply {other:?}")),
    }
}
