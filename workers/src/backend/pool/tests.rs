//! The pool's routing, growth, probing and budget, on synthetic instances.

use super::*;
use crate::backend::synthetic::Synthetic;
use crate::backend::tests_support::request;

fn spec(max: usize, warm: usize) -> PoolSpec {
    PoolSpec {
        max,
        warm,
        grow_at: 2,
        idle_unload: None,
        probe_after: Duration::from_secs(3600),
        balance: Balance::LeastBusy,
        bytes: 100,
        revision: None,
    }
}

/// A loader of synthetic instances (1 s per request) that counts loads.
fn loader(loads: Arc<AtomicUsize>, fail_rate: f64) -> Loader {
    Arc::new(move || {
        let loads = loads.clone();
        Box::pin(async move {
            loads.fetch_add(1, Ordering::SeqCst);
            let b = Synthetic::new(Duration::from_secs(1), 1, None, Some("r1".into())).with_fail_rate(fail_rate);
            Ok(Arc::new(b) as Arc<dyn Backend>)
        })
    })
}

async fn pool(name: &str, s: PoolSpec, budget: &Arc<Budget>, loads: &Arc<AtomicUsize>) -> Arc<Pool> {
    Pool::build(name, s, loader(loads.clone(), 0.0), LoadOn::Caller, budget.clone(), None).await.unwrap()
}

async fn burst(p: &Arc<Pool>, n: usize) -> Vec<tokio::task::JoinHandle<Result<Generation, BackendError>>> {
    let mut tasks = Vec::new();
    for k in 0..n {
        let p = p.clone();
        tasks.push(tokio::spawn(async move { p.generate(&request(&format!("r{k}")), Attempt::default()).await }));
        tokio::task::yield_now().await;
    }
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    tasks
}

#[tokio::test(start_paused = true)]
async fn lazy_pools_load_on_first_need_and_grow_only_when_saturated() {
    let (budget, loads) = (Budget::new(0), Arc::new(AtomicUsize::new(0)));
    let p = pool("m", spec(3, 0), &budget, &loads).await;
    assert_eq!((p.loaded(), p.revision().as_deref()), (0, Some("r1")), "lazy, but the revision is known");
    let tasks = burst(&p, 2).await;
    assert_eq!(p.loaded(), 1, "two requests fit one instance (grow_at 2)");
    let more = burst(&p, 2).await;
    assert_eq!(p.loaded(), 2, "a saturated instance makes the pool grow");
    assert_eq!(p.loads().iter().filter(|n| **n == 2).count(), 2, "two each");
    for t in tasks.into_iter().chain(more) {
        t.await.unwrap().unwrap();
    }
    let wide = burst(&p, 20).await;
    assert_eq!(p.loaded(), 3, "never more than max");
    assert_eq!(p.loads().iter().sum::<usize>(), 20);
    for t in wide {
        t.await.unwrap().unwrap();
    }
}

#[tokio::test(start_paused = true)]
async fn least_busy_and_round_robin_spread_requests() {
    let (budget, loads) = (Budget::new(0), Arc::new(AtomicUsize::new(0)));
    let p = pool("m", PoolSpec { grow_at: 100, ..spec(3, 3) }, &budget, &loads).await;
    let tasks = burst(&p, 6).await;
    assert_eq!(p.loads(), vec![2, 2, 2]);
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let rr = pool("r", PoolSpec { grow_at: 100, balance: Balance::RoundRobin, ..spec(2, 2) }, &budget, &loads).await;
    let tasks = burst(&rr, 4).await;
    assert_eq!(rr.loads(), vec![2, 2]);
    for t in tasks {
        t.await.unwrap().unwrap();
    }
}

#[tokio::test(start_paused = true)]
async fn idle_instances_are_unloaded_and_come_back_on_demand() {
    let (budget, loads) = (Budget::new(0), Arc::new(AtomicUsize::new(0)));
    let p = pool("m", PoolSpec { idle_unload: Some(Duration::from_secs(10)), ..spec(2, 2) }, &budget, &loads).await;
    assert_eq!((p.loaded(), budget.used()), (2, 200));
    tokio::time::sleep(Duration::from_secs(12)).await;
    assert_eq!((p.loaded(), budget.used()), (0, 0));
    let before = loads.load(Ordering::SeqCst);
    p.generate(&request("x"), Attempt::default()).await.unwrap();
    assert_eq!((p.loaded(), loads.load(Ordering::SeqCst)), (1, before + 1));
}

#[tokio::test(start_paused = true)]
async fn the_budget_unloads_the_least_recently_used_idle_model() {
    let (budget, loads) = (Budget::new(250), Arc::new(AtomicUsize::new(0)));
    let a = pool("a", spec(1, 1), &budget, &loads).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let b = pool("b", spec(1, 1), &budget, &loads).await;
    b.generate(&request("b1"), Attempt::default()).await.unwrap();
    let c = pool("c", PoolSpec { revision: Some("r1".into()), ..spec(1, 0) }, &budget, &loads).await;
    assert_eq!((a.loaded(), b.loaded(), c.loaded()), (1, 1, 0));
    c.generate(&request("c1"), Attempt::default()).await.unwrap();
    assert_eq!((a.loaded(), b.loaded(), c.loaded()), (0, 1, 1), "a was used least recently");
    // nothing idle to unload: a clear, retryable refusal
    let busy = burst(&b, 1).await;
    let busy_c = burst(&c, 1).await;
    let err = a.generate(&request("a1"), Attempt::default()).await.unwrap_err();
    assert_eq!((err.code, err.retryable), (ErrorCode::Overloaded, true));
    assert!(err.message.contains("memory budget"), "{}", err.message);
    for t in busy.into_iter().chain(busy_c) {
        t.await.unwrap().unwrap();
    }
}

#[tokio::test(start_paused = true)]
async fn loaded_instances_and_bytes_are_metrics() {
    let registry = prometheus::Registry::new();
    let budget = Budget::with_metrics(0, &registry).unwrap();
    let loads = Arc::new(AtomicUsize::new(0));
    let p = pool("m", PoolSpec { idle_unload: Some(Duration::from_secs(5)), ..spec(2, 2) }, &budget, &loads).await;
    let gauge = |name: &str| {
        registry.gather().iter().find(|f| f.name() == name).map(|f| f.get_metric()[0].get_gauge().get_value())
    };
    assert_eq!((gauge("fleet_model_instances"), gauge("fleet_model_memory_bytes")), (Some(2.0), Some(200.0)));
    tokio::time::sleep(Duration::from_secs(7)).await;
    assert_eq!(p.loaded(), 0);
    assert_eq!((gauge("fleet_model_instances"), gauge("fleet_model_memory_bytes")), (Some(0.0), Some(0.0)));
}

#[tokio::test(start_paused = true)]
async fn a_failing_probe_reloads_the_instance() {
    let budget = Budget::new(0);
    let loads = Arc::new(AtomicUsize::new(0));
    // every instance fails every call: the probe fails, the slot is reloaded
    let l = loader(loads.clone(), 1.0);
    let s = PoolSpec { probe_after: Duration::from_secs(5), ..spec(1, 1) };
    let p = Pool::build("m", s, l, LoadOn::Caller, budget.clone(), None).await.unwrap();
    assert_eq!(loads.load(Ordering::SeqCst), 1);
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert!(p.generate(&request("x"), Attempt::default()).await.is_err());
    assert_eq!(loads.load(Ordering::SeqCst), 2, "the instance was reloaded after its probe failed");
}

#[tokio::test(start_paused = true)]
async fn an_instance_with_an_open_breaker_gets_no_requests() {
    use crate::breaker::{Board, BreakerConfig};
    let board = Board::unregistered(BreakerConfig { consecutive_failures: 2, open_ms: 60_000, ..Default::default() });
    // slot 0 fails every call, slot 1 never
    let n = Arc::new(AtomicUsize::new(0));
    let l: Loader = Arc::new(move || {
        let k = n.fetch_add(1, Ordering::SeqCst);
        Box::pin(async move {
            let rate = if k == 0 { 1.0 } else { 0.0 };
            Ok(Arc::new(Synthetic::new(Duration::ZERO, 1, None, None).with_fail_rate(rate)) as Arc<dyn Backend>)
        })
    });
    let s = PoolSpec { grow_at: 100, ..spec(2, 2) };
    let p = Pool::build("m", s, l, LoadOn::Caller, Budget::new(0), Some(&board)).await.unwrap();
    let mut failures = 0;
    for k in 0..20 {
        if p.generate(&request(&format!("q{k}")), Attempt::default()).await.is_err() {
            failures += 1;
        }
    }
    assert_eq!(failures, 2, "only the calls that opened the sick instance's breaker failed");
    assert!(p.available());
}
