//! The adapter loader thread is supervised (issue 18): when it dies, the load it died on fails at
//! once (so the requests parked on it end instead of waiting forever), a new thread takes the
//! loads queued behind it, and a version that keeps killing it is refused. The death is injected
//! through the fault-injection seam.

use std::sync::Arc;
use std::time::Duration;

use caduceus_runtime::adapters::make::write_synthetic_adapters;
use caduceus_runtime::adapters::{
    AdapterLoader, AdapterService, LoadDone, LoadError, LoaderPool, Projection, MAX_LOADER_CRASHES,
};
use caduceus_runtime::model::loader::LoadedModel;
use caduceus_runtime::model::LoraDtype;

/// The next `n` finished loads, through `wait` (the path of a caller with nothing else to do).
fn next_loads(loader: &mut AdapterLoader, n: usize) -> Vec<LoadDone> {
    (0..n)
        .map(|_| {
            loader
                .wait(Duration::from_secs(30))
                .expect("the loader never answered")
        })
        .collect()
}

/// `n` synthetic adapters for the tiny reference model (named `doctor-0000`, ...) and a service
/// over them; the folder lives as long as the returned guard.
fn adapters(n: usize) -> (tempfile::TempDir, Arc<AdapterService>) {
    let model = LoadedModel::load(&super::support::shared("reference/tiny-llama/model")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let config = model.model.config();
    write_synthetic_adapters(config, tmp.path(), n, 8, &Projection::ALL, 5, 16.0).unwrap();
    let service = super::service(&model.model, tmp.path(), n, LoraDtype::F32);
    (tmp, service)
}

#[test]
fn a_dead_loader_fails_only_the_load_it_died_on_and_a_new_one_takes_the_rest() {
    let (_tmp, service) = adapters(3);
    let entries: Vec<_> = ["doctor-0000", "doctor-0001", "doctor-0002"]
        .iter()
        .map(|n| service.registry().get(n).unwrap())
        .collect();
    let mut loader = AdapterLoader::spawn(service.clone()).unwrap();
    loader.panic_on_load_of("doctor-0000".into());
    // The first load kills the thread; the one queued behind it (or queued after the death,
    // which `request` notices) goes to the new thread instead of failing with it.
    assert!(entries[..2].iter().all(|e| loader.request(e)));
    let done = next_loads(&mut loader, 2);
    let result = |name: &str| {
        done.iter()
            .find(|d| &*d.entry.name == name)
            .map(|d| d.result.as_ref().err().cloned())
    };
    assert_eq!(result("doctor-0000"), Some(Some(LoadError::LoaderStopped)));
    assert_eq!(
        result("doctor-0001"),
        Some(None),
        "the queued load failed too"
    );
    assert_eq!((loader.num_restarts(), loader.num_in_flight()), (1, 0));
    assert!(
        !service.loader_gate().is_busy(),
        "the dead job still holds the gate"
    );
    // One retry of the version that crashed is allowed: a transient fault costs nothing more.
    assert!(loader.request(&entries[0]));
    assert!(next_loads(&mut loader, 1)[0].result.is_ok());
    assert!(service.cached(&entries[0]).is_some());
    assert_eq!(loader.num_restarts(), 1);
}

#[test]
fn a_version_that_keeps_killing_the_loader_is_refused_without_restarting_it() {
    let (_tmp, service) = adapters(2);
    let bad = service.registry().get("doctor-0000").unwrap();
    let good = service.registry().get("doctor-0001").unwrap();
    let mut loader = AdapterLoader::spawn(service.clone()).unwrap();
    for crash in 1..=MAX_LOADER_CRASHES {
        loader.panic_on_load_of("doctor-0000".into());
        assert!(loader.request(&bad));
        let d = next_loads(&mut loader, 1).remove(0);
        assert_eq!(
            d.result.err(),
            Some(LoadError::LoaderStopped),
            "crash {crash}"
        );
    }
    assert_eq!(loader.num_restarts(), MAX_LOADER_CRASHES as usize);
    // Now refused at once, without a thread dying; twice asked before a poll, reported once.
    assert!(loader.request(&bad));
    assert!(loader.request(&bad));
    let done = loader.poll();
    assert_eq!(done.len(), 1);
    assert_eq!(
        done[0].result.as_ref().err(),
        Some(&LoadError::Quarantined {
            crashes: MAX_LOADER_CRASHES
        })
    );
    assert_eq!(loader.num_restarts(), MAX_LOADER_CRASHES as usize);
    assert_eq!(loader.num_in_flight(), 0);
    // Other adapters load as before.
    assert!(loader.request(&good));
    assert!(next_loads(&mut loader, 1)[0].result.is_ok());
}

#[test]
fn a_pool_loads_every_adapter_once_and_a_dead_thread_fails_only_its_own_load() {
    let (_tmp, service) = adapters(8);
    let entries: Vec<_> = (0..8)
        .map(|i| service.registry().get(&format!("doctor-{i:04}")).unwrap())
        .collect();
    let mut pool = LoaderPool::spawn(service.clone(), 3).unwrap();
    assert_eq!(pool.threads(), 3);
    pool.panic_on_load_of("doctor-0003".into());
    assert!(entries.iter().all(|e| pool.request(e)));
    let mut done = Vec::new();
    while done.len() < entries.len() {
        let d = pool
            .wait(Duration::from_secs(30))
            .expect("the pool never answered");
        done.push(d);
        done.extend(pool.poll());
    }
    assert_eq!(done.len(), entries.len(), "a load was reported twice");
    for e in &entries {
        let d = done.iter().find(|d| d.entry.name == e.name).unwrap();
        match &*e.name {
            "doctor-0003" => assert_eq!(d.result.as_ref().err(), Some(&LoadError::LoaderStopped)),
            name => {
                assert!(d.result.is_ok(), "{name}: {:?}", d.result.as_ref().err());
                assert!(service.cached(e).is_some(), "{name} not in the host cache");
            }
        }
    }
    assert_eq!((pool.num_restarts(), pool.num_in_flight()), (1, 0));
    assert!(!service.loader_gate().is_busy());
    // Its thread was restarted: the version that crashed loads on retry.
    assert!(pool.request(&entries[3]));
    assert!(pool.wait(Duration::from_secs(30)).unwrap().result.is_ok());
}
