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
use stretch_witness::raft::generation::generation_dir;
use stretch_witness::raft::network::{Envelope, RpcRequest, RpcResponse};
use stretch_witness::raft::node::{NodeError, WitnessNode};
use stretch_witness::raft::{generation_of, node_id, Member, NodeId, NODE_A, NODE_B, NODE_W};
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

/// Sends one framed envelope to `addr` and decodes the reply.
async fn raw_rpc(addr: &str, envelope: &Envelope) -> RpcResponse {
    let body = postcard::to_stdvec(envelope).expect("encode");
    let mut f = (body.len() as u32).to_le_bytes().to_vec();
    f.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
    f.extend_from_slice(&body);
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(&f).await.expect("send");
    let mut head = [0u8; 8];
    s.read_exact(&mut head).await.expect("reply header");
    let len = u32::from_le_bytes(head[..4].try_into().expect("4 bytes")) as usize;
    let mut reply = vec![0u8; len];
    s.read_exact(&mut reply).await.expect("reply body");
    postcard::from_bytes(&reply).expect("decode reply")
}

// Reference: DESIGN §6 force-survivor — "the site becomes a one-voter group with a new
// generation ... the others rejoin under new node ids". The old group (B and W, still a
// majority of generation 0 and at a higher term) keeps sending to the forced site's address:
// every one of its RPCs is refused, so the new group's leader, term and map stay its own.
// A fresh witness then joins under generation 1's id and receives the carried map.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn force_survivor_starts_a_generation_that_refuses_the_old_group() {
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
    let mut nodes = BTreeMap::new();
    for (id, l) in listeners {
        nodes.insert(id, start(id, tmp.path(), l).await);
    }
    nodes[&NODE_A]
        .bootstrap(members.clone())
        .await
        .expect("bootstrap");
    let all: Vec<&WitnessNode> = nodes.values().collect();
    propose(
        &all,
        Command::VolumeCreate {
            volume: 1,
            cg: 1,
            size_bytes: 1 << 30,
            policy: AckPolicy::Sync,
            preference: Preference::Pinned(Site::B),
        },
    )
    .await;
    let created = all[0].local_map();
    for n in &all {
        wait_for_map(n, &created).await;
    }

    // Site A is cut off; it is forced to carry on alone in generation 1, at its old address.
    let old_a = nodes.remove(&NODE_A).expect("a");
    let carried = old_a.local_map();
    old_a.shutdown().await;
    let a_addr = members[&NODE_A].addr.clone();
    let a1 = node_id(1, Member::A);
    assert!(
        ![NODE_A, NODE_B, NODE_W].contains(&a1),
        "ids are never reused"
    );
    assert_eq!(generation_of(a1), 1);
    let a_dir = tmp.path().join(format!("node-{NODE_A}"));
    let listener = TcpListener::bind(&a_addr).await.expect("rebind a");
    let forced = WitnessNode::start(a1, &generation_dir(&a_dir, 1), listener)
        .await
        .expect("start generation 1");
    forced
        .bootstrap(BTreeMap::from([(a1, BasicNode::new(a_addr.clone()))]))
        .await
        .expect("one-voter group");
    wait_for_leader(&[&forced]).await;
    let result = forced
        .propose(Command::ForceSurvivor {
            survivor: Site::A,
            generation: 1,
            carried: Some(Box::new(carried.clone())),
        })
        .await
        .expect("commit alone");
    let g1 = Epoch::first(1);
    assert_eq!(result, ApplyResult::One(Outcome::Applied { epoch: g1 }));
    let term = forced.leader().1;

    // The old group elects among B and W at a higher term and keeps dialing A's address.
    let old: Vec<&WitnessNode> = nodes.values().collect();
    wait_for_leader(&old).await;
    let old_term = old.iter().map(|n| n.leader().1).max().expect("two nodes");
    // Long enough for dozens of the old leader's heartbeats (100 ms) to reach the address.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        forced.leader(),
        (Some(a1), term),
        "the old group moved the new one"
    );
    assert!(old_term >= term, "the old group's term {old_term} < {term}");
    let map = forced.read_map().await.expect("linearizable read alone");
    assert_eq!(map.cg(1).expect("carried cg").epoch, g1);
    assert_eq!(map.cg(1).expect("cg").state(Site::B), SiteState::Detached);
    assert_eq!(map.cg(1).expect("cg").fenced_before(Site::B), g1);
    // Any request of generation 0 is refused unread, a proposal included.
    let refused = raw_rpc(
        &a_addr,
        &Envelope {
            generation: 0,
            req: RpcRequest::ClientWrite(Command::SetPreference {
                cg: 1,
                preference: Preference::Pinned(Site::B),
            }),
        },
    )
    .await;
    assert!(
        matches!(refused, RpcResponse::WrongGeneration { generation: 1 }),
        "{refused:?}"
    );
    assert_eq!(forced.local_map(), map);
    // And the old group refuses generation 1's.
    let theirs = raw_rpc(
        &members[&NODE_W].addr,
        &Envelope {
            generation: 1,
            req: RpcRequest::ReadMap,
        },
    )
    .await;
    assert!(
        matches!(theirs, RpcResponse::WrongGeneration { generation: 0 }),
        "{theirs:?}"
    );

    // A fresh witness joins under generation 1's id, and receives the carried map.
    let w1 = node_id(1, Member::W);
    let wl = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let w_addr = wl.local_addr().expect("addr").to_string();
    let fresh_w = WitnessNode::start(w1, &tmp.path().join("w-gen-1"), wl)
        .await
        .expect("start fresh witness");
    forced
        .add_voters(
            BTreeMap::from([(w1, BasicNode::new(w_addr))]),
            [a1, w1].into_iter().collect(),
            CONDITION_DEADLINE,
        )
        .await
        .expect("add the witness");
    wait_for_map(&fresh_w, &map).await;
    assert_eq!(forced.voters(), vec![a1, w1]);
    fresh_w.shutdown().await;
    forced.shutdown().await;
    for (_, n) in nodes {
        n.shutdown().await;
    }
}
