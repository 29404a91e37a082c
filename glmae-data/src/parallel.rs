//! Running independent jobs on a few threads, keeping results in job order.

use std::sync::atomic::{AtomicUsize, Ordering};

/// `f(0..n)` on `threads` threads (work-stealing by index); results in index order. A job that
/// panics yields `on_panic`.
pub fn map_indexed<T: Send>(
    n: usize,
    threads: usize,
    on_panic: impl Fn() -> T + Sync,
    f: impl Fn(usize) -> T + Sync,
) -> Vec<T> {
    let next = AtomicUsize::new(0);
    let mut out: Vec<(usize, T)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads.clamp(1, n.max(1)))
            .map(|_| {
                s.spawn(|| {
                    let mut done = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= n {
                            break;
                        }
                        done.push((i, f(i)));
                    }
                    done
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_else(|_| vec![(usize::MAX, on_panic())]))
            .collect()
    });
    out.sort_by_key(|(i, _)| *i);
    out.into_iter().map(|(_, t)| t).collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn results_come_back_in_order_whatever_the_threads() {
        for threads in [1, 2, 5] {
            let r = super::map_indexed(20, threads, || usize::MAX, |i| i * i);
            assert_eq!(r, (0..20).map(|i| i * i).collect::<Vec<_>>());
        }
    }
}
