//! Retries after a lost connection: a fragment whose second run releases the same answer and
//! spends nothing is sent once more; a DP fragment never is. A TCP proxy in front of one
//! station cuts the connection (a reset) when the hub's `DoGet` request reaches it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use arrow::array::AsArray;
use arrow::datatypes::Int64Type;
use railyard::client::HubClient;
use railyard_engine::{Hub, HubOptions, StationAddress};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::fixtures;

/// Forwards to a station; when armed, resets the connection that carries the next `DoGet`
/// (a chunk from the hub holding a fragment ticket, but not the `check` action's) instead of
/// forwarding it.
struct CutProxy {
    addr: SocketAddr,
    armed: Arc<AtomicUsize>,
    cuts: Arc<AtomicUsize>,
    /// `DoGet` requests forwarded to the station.
    fetches: Arc<AtomicUsize>,
}

fn is_fetch(chunk: &[u8]) -> bool {
    let has = |needle: &[u8]| chunk.windows(needle.len()).any(|w| w == needle);
    has(b"\"query_id\"") && !has(b"check")
}

impl CutProxy {
    async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy = Self {
            addr: listener.local_addr().unwrap(),
            armed: Arc::default(),
            cuts: Arc::default(),
            fetches: Arc::default(),
        };
        let (armed, cuts, fetches) = (
            Arc::clone(&proxy.armed),
            Arc::clone(&proxy.cuts),
            Arc::clone(&proxy.fetches),
        );
        tokio::spawn(async move {
            while let Ok((mut hub, _)) = listener.accept().await {
                let (armed, cuts, fetches) =
                    (Arc::clone(&armed), Arc::clone(&cuts), Arc::clone(&fetches));
                tokio::spawn(async move {
                    let Ok(mut station) = TcpStream::connect(target).await else {
                        return;
                    };
                    let (mut a, mut b) = (vec![0u8; 65536], vec![0u8; 65536]);
                    loop {
                        tokio::select! {
                            n = hub.read(&mut a) => {
                                let Ok(n @ 1..) = n else { return };
                                if is_fetch(&a[..n]) {
                                    let cut = armed
                                        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                                        .is_ok();
                                    if cut {
                                        cuts.fetch_add(1, Ordering::SeqCst);
                                        // A reset, as when a host or process dies.
                                        let _ = hub.set_zero_linger();
                                        return;
                                    }
                                    fetches.fetch_add(1, Ordering::SeqCst);
                                }
                                if station.write_all(&a[..n]).await.is_err() { return }
                            }
                            n = station.read(&mut b) => {
                                let Ok(n @ 1..) = n else { return };
                                if hub.write_all(&b[..n]).await.is_err() { return }
                            }
                        }
                    }
                });
            }
        });
        proxy
    }
}

/// Serves `station` on a free loopback port until the test ends; returns the address.
async fn serve(station: Arc<railyard_station::Station>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        railyard_station::serve(station, listener, std::future::pending())
            .await
            .unwrap();
    });
    addr
}

/// Three stations under the open test policy with a DP budget (its ledger beside each audit
/// log) and a hub that reaches station_c through a [`CutProxy`].
async fn federation_with_a_proxy() -> (String, CutProxy, std::path::PathBuf) {
    let (dir, policy_file) = dp_policy(10.0);
    let mut addresses = Vec::new();
    let mut proxy = None;
    for name in fixtures::STATIONS {
        let mut addr = serve(fixtures::lung_station(name, &policy_file, &dir).await).await;
        if name == "station_c" {
            let cut = CutProxy::start(addr).await;
            addr = cut.addr;
            proxy = Some(cut);
        }
        addresses.push(StationAddress {
            name: name.to_string(),
            url: format!("grpc://{addr}"),
        });
    }
    let hub = Arc::new(
        Hub::connect(&addresses, HubOptions::default())
            .await
            .unwrap(),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hub_url = format!("grpc://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        railyard_engine::serve(hub, listener, std::future::pending())
            .await
            .unwrap();
    });
    (hub_url, proxy.unwrap(), dir)
}

/// A fresh directory holding the open test policy with a DP budget of `budget` per
/// researcher (ε 0.5 per query); returns the directory and the policy file.
fn dp_policy(budget: f64) -> (std::path::PathBuf, std::path::PathBuf) {
    let dir = fixtures::audit_dir();
    let policy_file = dir.join("policy.toml");
    let open = std::fs::read_to_string(fixtures::repo().join("tests/policies/open.toml")).unwrap();
    std::fs::write(
        &policy_file,
        format!(
            "{open}\n[dp]\nbudget = {budget:?}\nmax_epsilon = 1.0\nepsilon = 0.5\n\n\
             [tables.lung.dp]\nsex = {{ keys = [1, 2] }}\n"
        ),
    )
    .unwrap();
    (dir, policy_file)
}

/// The ε charges in a station's ledger.
fn charges(dir: &std::path::Path, station: &str) -> i64 {
    let ledger = rusqlite::Connection::open(dir.join(station).join("ledger.sqlite")).unwrap();
    ledger
        .query_row("SELECT count(*) FROM charges", [], |r| r.get(0))
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exact_aggregate_whose_connection_is_lost_is_sent_once_more() {
    let (hub_url, proxy, _) = federation_with_a_proxy().await;
    let mut client = HubClient::connect(&hub_url).await.unwrap();
    proxy.armed.store(1, Ordering::SeqCst);
    let answer = client
        .query("SELECT count(*) AS n FROM lung")
        .await
        .expect("a retried exact aggregate is answered");
    assert_eq!(
        proxy.cuts.load(Ordering::SeqCst),
        1,
        "the proxy cut no fetch"
    );
    assert_eq!(
        proxy.fetches.load(Ordering::SeqCst),
        1,
        "the fetch was not sent again"
    );
    let n = answer.batches[0]
        .column(0)
        .as_primitive::<Int64Type>()
        .value(0);
    assert_eq!(n, 228, "the pooled lung table has 228 patients");

    // Twice in a row, the second failure is not retried: one retry, not a loop.
    proxy.armed.store(2, Ordering::SeqCst);
    let err = client
        .query("SELECT count(*) AS n FROM lung")
        .await
        .expect_err("a fragment is retried once only")
        .to_string();
    assert!(
        err.contains("station 'station_c'") && err.contains("unreachable"),
        "{err}"
    );
    assert_eq!(proxy.cuts.load(Ordering::SeqCst), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dp_fragment_whose_connection_is_lost_is_never_sent_again() {
    let (hub_url, proxy, dir) = federation_with_a_proxy().await;
    let mut client = HubClient::connect(&hub_url).await.unwrap();
    let dp = "SELECT sex, dp_count(*) AS n FROM lung GROUP BY sex";
    proxy.armed.store(1, Ordering::SeqCst);
    let err = client
        .query(dp)
        .await
        .expect_err("a DP fragment is not retried")
        .to_string();
    assert!(
        err.contains("station 'station_c'") && err.contains("unreachable"),
        "{err}"
    );
    assert_eq!(proxy.cuts.load(Ordering::SeqCst), 1);
    assert_eq!(
        proxy.fetches.load(Ordering::SeqCst),
        0,
        "the DP fragment was sent again"
    );
    // The cut request never reached station_c: nothing charged there. (Had it been cut after
    // the charge, a retry would have charged again.)
    assert_eq!(charges(&dir, "station_c"), 0);
    // Once the link holds, the researcher asks again and is answered (and charged once).
    let answer = client.query(dp).await.unwrap();
    assert_eq!(
        answer.batches.iter().map(|b| b.num_rows()).sum::<usize>(),
        2
    );
    assert_eq!(charges(&dir, "station_c"), 1);
}

/// A hub that hangs up on a DP fragment (because another station failed, or the researcher
/// cancelled) must not stop the station between the ε charge and its audit record: every
/// charge has its record at once, not only after the next restart. The calls are dropped
/// after delays that sweep the fragment's whole run, so some land between the two writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dp_fragment_whose_caller_hangs_up_keeps_its_audit_record() {
    let (dir, policy_file) = dp_policy(1000.0);
    let station = fixtures::lung_station("station_a", &policy_file, &dir).await;
    let url = format!("grpc://{}", serve(station).await);
    let sql = "SELECT sex, partial_dp_count(1) AS \"a0\" FROM \"lung\" GROUP BY sex";
    // One complete call first: it is charged and recorded, and shows how long a call takes.
    let started = std::time::Instant::now();
    fixtures::run_at_station(&url, sql).await.unwrap();
    let whole = started.elapsed();
    let attempts = 40u32;
    for i in 0..attempts {
        let (url, delay) = (url.clone(), whole * i / attempts);
        let call = tokio::spawn(async move { fixtures::run_at_station(&url, sql).await });
        tokio::time::sleep(delay).await;
        call.abort();
        let _ = call.await;
    }
    let charged = || {
        let ledger =
            rusqlite::Connection::open(dir.join("station_a").join("ledger.sqlite")).unwrap();
        let mut query = ledger
            .prepare("SELECT query_id, fragment FROM charges")
            .unwrap();
        query
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap()
    };
    let recorded = || -> Vec<(String, i64)> {
        std::fs::read_to_string(dir.join("station_a").join("audit.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|r| r["epsilon"].is_number())
            .map(|r| {
                (
                    r["query_id"].as_str().unwrap().to_string(),
                    r["fragment"].as_i64().unwrap(),
                )
            })
            .collect()
    };
    // A call that was dropped may still be running at the station: wait for it to end.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let (charges, records) = (charged(), recorded());
        if charges.len() == records.len() || std::time::Instant::now() > deadline {
            // Every call carries the same query id: the counts must agree.
            assert!(charges.len() > 1, "only the complete call was charged");
            assert_eq!(
                charges.len(),
                records.len(),
                "charges without an audit record: {charges:?} against {records:?}"
            );
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let verified = railyard_audit::verify(&dir.join("station_a").join("audit.jsonl")).unwrap();
    assert!(verified.broken.is_none(), "{verified:?}");
}
