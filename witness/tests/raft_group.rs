//! The witness Raft group in-process: three voters on 127.0.0.1 with file-backed storage.
//! Reference: DESIGN §6 — the detach CAS through Raft survives the loss of the leader, and
//! a node restarted from its directory recovers the map from its durable log.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use openraft::BasicNode;
use stretch_witness::map::{
    AckPolicy, ApplyResult, ClusterMap, Command, Epoch, Outcome, Preference, Reject, Site,
    SiteState,
};
use stretch_witness::raft::node::{NodeError, WitnessNode};
use stretch_witness::raft::{NodeId, NODE_A, NODE_B, NODE_W};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Every wait below is for a condition, bounded by this.
const CONDITION_DEADLINE: Duration = Duration::from_secs(20);

async fn start(id: NodeId, dir: &Path, listener: TcpListener) -> WitnessNode {
    WitnessNode::start(id, &dir.join(format!("node-{id}")), listener)
        .await
        .expect("start node")
}

async fn wait_for_leader(nodes: &[&WitnessNode]) -> NodeId {
    let deadline = tokio::time::Instant::now() + CONDITION_DEADLINE;
    loop {
        for n in nodes {
            let m = n.raft.metrics().borrow().clone();
            if m.current_leader == Some(n.id) {
                return n.id;
            }
        }
        assert!(tokio::time::Instant::now() < deadline, "no leader elected");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn wait_for_map(node: &WitnessNode, want: &ClusterMap) {
    let deadline = tokio::time::Instant::now() + CONDITION_DEADLINE;
    while node.local_map() != *want {
        assert!(
            tokio::time::Instant::now() < deadline,
            "node {} never caught up",
            node.id
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Proposes through whichever node leads, retrying while leadership settles.
async fn propose(nodes: &[&WitnessNode], cmd: Command) -> ApplyResult {
    let deadline = tokio::time::Instant::now() + CONDITION_DEADLINE;
    loop {
        let leader = wait_for_leader(nodes).await;
        let node = nodes
            .iter()
            .find(|n| n.id == leader)
            .expect("leader is one of the nodes");
        match node.propose(cmd.clone()).await {
            Ok(r) => return r,
            Err(NodeError::NotLeader { .. }) => {}
            Err(e) => panic!("propose failed: {e}"),
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "proposal never committed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn detach_survives_leader_loss_and_the_cas_still_holds() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut listeners = BTreeMap::new();
    for id in [NODE_A, NODE_B, NODE_W] {
        listeners.insert(id, TcpListener::bind("127.0.0.1:0").await.expect("bind"));
    }
    let members: BTreeMap<NodeId, BasicNode> = listeners
        .iter()
        .map(|(id, l)| {
            (
                *id,
                BasicNode::new(l.local_addr().expect("addr").to_string()),
            )
        })
        .collect();
    let addr_of = |id: NodeId| members[&id].addr.clone();
    let mut nodes = BTreeMap::new();
    for (id, l) in listeners {
        nodes.insert(id, start(id, tmp.path(), l).await);
    }
    nodes[&NODE_A]
        .bootstrap(members.clone())
        .await
        .expect("one-time bootstrap");

    // DESIGN §7 invariant 7: garbage on the Raft port (an oversized length, a frame that
    // does not decode) closes that connection only; the group goes on committing below.
    for garbage in [vec![0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0], {
        let body = [0xde, 0xad, 0xbe, 0xef];
        let mut f = (body.len() as u32).to_le_bytes().to_vec();
        f.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
        f.extend_from_slice(&body);
        f
    }] {
        let mut s = TcpStream::connect(addr_of(NODE_W)).await.expect("connect");
        s.write_all(&garbage).await.expect("send garbage");
        let mut buf = [0u8; 1];
        let read = tokio::time::timeout(CONDITION_DEADLINE, s.read(&mut buf)).await;
        assert!(
            matches!(read, Ok(Ok(0)) | Ok(Err(_))),
            "the node closes a garbage connection"
        );
    }

    let all: Vec<&WitnessNode> = nodes.values().collect();
    let e1 = Epoch::first(0);
    let created = propose(
        &all,
        Command::VolumeCreate {
            volume: 1,
            cg: 1,
            size_bytes: 1 << 30,
            policy: AckPolicy::Sync,
            preference: Preference::Pinned(Site::A),
        },
    )
    .await;
    assert_eq!(created, ApplyResult::One(Outcome::Applied { epoch: e1 }));
    // Bootstrap is one-time: once a node holds the group's log it refuses another. (Calling
    // it on a still-empty node with the same members is harmless, openraft documents that.)
    for n in &all {
        wait_for_map(n, &all[0].local_map()).await;
        assert!(
            n.bootstrap(members.clone()).await.is_err(),
            "node {} bootstrapped twice",
            n.id
        );
    }
    let detach = Command::Detach {
        cg: 1,
        survivor: Site::A,
        expected_epoch: e1,
    };
    let e2 = e1.next().expect("next epoch");
    assert_eq!(
        propose(&all, detach).await,
        ApplyResult::One(Outcome::Applied { epoch: e2 })
    );

    // Kill the leader.
    let leader = wait_for_leader(&all).await;
    let killed = nodes.remove(&leader).expect("leader node");
    let want = killed.local_map();
    killed.shutdown().await;

    let rest: Vec<&WitnessNode> = nodes.values().collect();
    let new_leader = wait_for_leader(&rest).await;
    assert_ne!(new_leader, leader);
    let read = rest
        .iter()
        .find(|n| n.id == new_leader)
        .expect("leader")
        .read_map()
        .await;
    let map = read.expect("linearizable read on the new leader");
    assert_eq!(map, want, "the committed detach survived the leader");
    let cg = map.cg(1).expect("cg 1");
    assert_eq!(cg.epoch, e2);
    assert_eq!(cg.state(Site::B), SiteState::Detached);
    assert_eq!(cg.fenced_before(Site::B), e2);

    // The CAS still holds: the racing detach with the old epoch loses, and the detached site
    // cannot be crowned with the current one.
    let late = Command::Detach {
        cg: 1,
        survivor: Site::B,
        expected_epoch: e1,
    };
    assert_eq!(
        propose(&rest, late).await,
        ApplyResult::One(Outcome::Rejected {
            reason: Reject::EpochMismatch { current: e2 }
        })
    );
    let crown = Command::Detach {
        cg: 1,
        survivor: Site::B,
        expected_epoch: e2,
    };
    assert_eq!(
        propose(&rest, crown).await,
        ApplyResult::One(Outcome::Rejected {
            reason: Reject::SurvivorNotInSync
        })
    );

    // The killed node restarts from its directory under the same id (same disk, so not a
    // reuse). First on a port nobody knows: what it has then came from its own disk.
    let hidden = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let alone = start(leader, tmp.path(), hidden).await;
    assert_eq!(
        alone.local_map(),
        want,
        "the map was rebuilt from the durable log"
    );
    alone.shutdown().await;
    // Then at its address, where it catches up with the group.
    let listener = TcpListener::bind(addr_of(leader))
        .await
        .expect("rebind the old address");
    let back = start(leader, tmp.path(), listener).await;
    let final_map = rest[0].local_map();
    wait_for_map(&back, &final_map).await;
    back.shutdown().await;
    for (_, n) in nodes {
        n.shutdown().await;
    }
}
