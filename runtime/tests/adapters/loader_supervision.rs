//! The adapter loader thread is supervised (issue 18): when it dies, every load it had not
//! finished fails at once (so the requests parked on them end instead of waiting forever) and a
//! new thread takes over. The death is injected through the fault-injection seam.

use std::collections::BTreeSet;
use std::time::Duration;

use caduceus_runtime::adapters::make::write_synthetic_adapters;
use caduceus_runtime::adapters::{AdapterLoader, LoadDone, LoadError, Projection};
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

#[test]
fn a_dead_loader_fails_its_unfinished_loads_and_a_new_one_takes_over() {
    let model = LoadedModel::load(&super::support::shared("reference/tiny-llama/model")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let config = model.model.config();
    write_synthetic_adapters(config, tmp.path(), 2, 8, &Projection::ALL, 5, 16.0).unwrap();
    let service = super::service(&model.model, tmp.path(), 2, LoraDtype::F32);
    let entries: Vec<_> = ["doctor-0000", "doctor-0001"]
        .iter()
        .map(|n| service.registry().get(n).unwrap())
        .collect();
    let mut loader = AdapterLoader::spawn(service.clone()).unwrap();
    loader.panic_on_load_of("doctor-0000".into());
    // The first load kills the thread. The second, queued behind it, fails with it, unless the
    // thread was already dead when it was queued: then `request` restarted the loader for it.
    assert!(entries.iter().all(|e| loader.request(e)));
    let done = next_loads(&mut loader, 2);
    let names: BTreeSet<&str> = done.iter().map(|d| &*d.entry.name).collect();
    assert_eq!(names, BTreeSet::from(["doctor-0000", "doctor-0001"]));
    for d in &done {
        let stopped = d.result.as_ref().err() == Some(&LoadError::LoaderStopped);
        let loaded = d.result.is_ok() && &*d.entry.name == "doctor-0001";
        assert!(
            stopped || loaded,
            "{}: {:?}",
            d.entry.name,
            d.result.as_ref().err()
        );
    }
    assert_eq!((loader.num_restarts(), loader.num_in_flight()), (1, 0));
    assert!(
        !service.loader_gate().is_busy(),
        "the dead job still holds the gate"
    );
    // The new thread loads both.
    assert!(entries.iter().all(|e| loader.request(e)));
    for d in next_loads(&mut loader, 2) {
        assert!(d.result.is_ok(), "{:?}", d.result.err());
    }
    assert!(entries.iter().all(|e| service.cached(e).is_some()));
    assert_eq!(loader.num_restarts(), 1);
}
