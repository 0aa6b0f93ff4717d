//! The CPU time of one thread, readable from other threads: a compile's time limit charges the
//! grammar's own work, not the time its thread waited for a core on a busy server.

use std::time::{Duration, Instant};

/// A thread's CPU clock (wall time since [`ThreadClock::current`] where the platform has no
/// per-thread CPU clock).
#[derive(Clone, Copy, Debug)]
pub struct ThreadClock {
    #[cfg(target_os = "linux")]
    cpu: Option<libc::clockid_t>,
    started: Instant,
}

impl ThreadClock {
    /// The calling thread's clock.
    pub fn current() -> ThreadClock {
        ThreadClock {
            #[cfg(target_os = "linux")]
            cpu: linux::current(),
            started: Instant::now(),
        }
    }

    /// Whether [`Self::elapsed`] is CPU time (false: wall time, which counts waits for a core).
    pub fn counts_cpu(&self) -> bool {
        #[cfg(target_os = "linux")]
        return self.cpu.is_some();
        #[cfg(not(target_os = "linux"))]
        return false;
    }

    /// Time the thread has spent on a CPU since it started (wall time since [`Self::current`]
    /// without a CPU clock). `None` once the thread has ended: read it only while the thread is
    /// known to run.
    pub fn elapsed(&self) -> Option<Duration> {
        #[cfg(target_os = "linux")]
        if let Some(clock) = self.cpu {
            return linux::read(clock);
        }
        Some(self.started.elapsed())
    }
}

#[cfg(target_os = "linux")]
mod linux {
    use std::time::Duration;

    pub fn current() -> Option<libc::clockid_t> {
        let mut clock: libc::clockid_t = 0;
        // SAFETY: pthread_self() is the calling thread, alive for this call; the out pointer is a
        // live local.
        let rc = unsafe { libc::pthread_getcpuclockid(libc::pthread_self(), &mut clock) };
        (rc == 0).then_some(clock)
    }

    pub fn read(clock: libc::clockid_t) -> Option<Duration> {
        let mut t = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: the out pointer is a live local; an ended thread's clock is an error, not UB.
        let rc = unsafe { libc::clock_gettime(clock, &mut t) };
        (rc == 0).then(|| Duration::new(t.tv_sec as u64, t.tv_nsec as u32))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sleeping_thread_spends_no_cpu_time_and_a_busy_one_does() {
        let clock = ThreadClock::current();
        let before = clock.elapsed().unwrap();
        std::thread::sleep(Duration::from_millis(200));
        let slept = clock.elapsed().unwrap() - before;
        let busy_until = Instant::now() + Duration::from_millis(50);
        let mut spins = 0u64;
        while Instant::now() < busy_until {
            spins = std::hint::black_box(spins + 1);
        }
        let busy = clock.elapsed().unwrap() - before - slept;
        assert_eq!(clock.counts_cpu(), cfg!(target_os = "linux"));
        if clock.counts_cpu() {
            assert!(slept < Duration::from_millis(50), "sleeping cost {slept:?}");
        }
        assert!(busy > Duration::ZERO, "{spins} spins took no time");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn another_thread_reads_a_running_threads_clock() {
        let (tx, rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
        let t = std::thread::spawn(move || {
            tx.send(ThreadClock::current()).unwrap();
            while stop_rx.try_recv().is_err() {
                std::hint::spin_loop();
            }
        });
        let clock = rx.recv().unwrap();
        let first = clock.elapsed().unwrap();
        std::thread::sleep(Duration::from_millis(50));
        let later = clock.elapsed().unwrap();
        assert!(later > first, "{first:?} -> {later:?}");
        stop_tx.send(()).unwrap();
        t.join().unwrap();
    }
}
