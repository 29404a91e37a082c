//! Keeping the model fed: each volume is decoded and preprocessed once (in memory, and optionally
//! on disk across runs), and random samples are made in worker threads ahead of the training loop,
//! in a fixed order, so a seed gives the same batches whatever the thread timing.

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, sync_channel};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result, anyhow, ensure};

use crate::dataset::Case;
use crate::io::atomic_write;
use crate::nifti_io::read_nifti;
use crate::preprocess::Preprocessor;
use crate::transforms::Rng;
use crate::volume::{Affine, Labels, Volume};

/// A preprocessed case.
#[derive(Clone, Debug, PartialEq)]
pub struct Prepared {
    /// The image on the model grid.
    pub image: Volume,
    /// Its labels, when the case is labelled.
    pub labels: Option<Labels>,
}

/// Decodes and preprocesses each case once.
pub struct VolumeCache {
    preprocessor: Preprocessor,
    disk: Option<PathBuf>,
    memory: Mutex<HashMap<Case, Arc<Prepared>>>,
}

const CACHE_MAGIC: &[u8; 8] = b"GLMCACH1";

impl VolumeCache {
    /// A cache applying `preprocessor`; with `disk`, results also persist in that folder, keyed
    /// by file path, size, modification time and the preprocessing parameters.
    pub fn new(preprocessor: Preprocessor, disk: Option<PathBuf>) -> Self {
        Self { preprocessor, disk, memory: Mutex::new(HashMap::new()) }
    }

    /// The prepared case, decoding it on first use.
    pub fn get(&self, case: &Case) -> Result<Arc<Prepared>> {
        if let Some(p) = self.memory.lock().map_err(|_| anyhow!("cache lock poisoned"))?.get(case) {
            return Ok(p.clone());
        }
        let prepared = Arc::new(self.load(case)?);
        self.memory
            .lock()
            .map_err(|_| anyhow!("cache lock poisoned"))?
            .insert(case.clone(), prepared.clone());
        Ok(prepared)
    }

    /// Prepares `cases` on `threads` threads; errors name every failing file.
    pub fn warm(&self, cases: &[Case], threads: usize) -> Result<()> {
        let errors: Vec<String> = crate::parallel::map_indexed(
            cases.len(),
            threads,
            || Some("a loader thread crashed".to_string()),
            |i| self.get(&cases[i]).err().map(|e| format!("{e:#}")),
        )
        .into_iter()
        .flatten()
        .collect();
        ensure!(errors.is_empty(), "{} case(s) failed to load:\n  {}", errors.len(), errors.join("\n  "));
        Ok(())
    }

    fn key(&self, case: &Case) -> Option<String> {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        for p in std::iter::once(&case.image).chain(case.label.as_ref()) {
            let m = std::fs::metadata(p).ok()?;
            p.hash(&mut h);
            m.len().hash(&mut h);
            m.modified().ok()?.hash(&mut h);
        }
        format!("{:?}", self.preprocessor).hash(&mut h);
        Some(format!("{:016x}.bin", h.finish()))
    }

    fn load(&self, case: &Case) -> Result<Prepared> {
        let disk_path = self.disk.as_ref().and_then(|d| Some(d.join(self.key(case)?)));
        if let Some(p) = &disk_path {
            // A damaged cache entry is rebuilt, not trusted.
            if let Ok(prepared) = read_cached(p) {
                return Ok(prepared);
            }
        }
        let image = read_nifti(&case.image)?;
        let prepared = match &case.label {
            Some(lp) => {
                let lab = read_nifti(lp)?.volume;
                let labels = to_labels(lab).with_context(|| format!("{}", lp.display()))?;
                let (img, lab) = self
                    .preprocessor
                    .apply_with_labels(&image.volume, &labels)
                    .with_context(|| format!("{} with {}", case.image.display(), lp.display()))?;
                Prepared { image: img, labels: Some(lab) }
            }
            None => {
                let (img, _) = self
                    .preprocessor
                    .apply(&image.volume)
                    .with_context(|| format!("{}", case.image.display()))?;
                Prepared { image: img, labels: None }
            }
        };
        if let Some(p) = &disk_path {
            write_cached(p, &prepared)?;
        }
        Ok(prepared)
    }
}

/// A label volume read as floats, checked to hold class indices 0-255.
pub fn to_labels(v: Volume) -> Result<Labels> {
    if let Some(bad) = v.data.iter().find(|&&x| !(0.0..=255.0).contains(&x) || x.fract() != 0.0) {
        anyhow::bail!("label value {bad} is not a class index 0-255");
    }
    ensure!(v.channels == 1, "label map has {} channels, expected 1", v.channels);
    Ok(Volume {
        data: v.data.iter().map(|&x| x as u8).collect(),
        shape: v.shape,
        channels: 1,
        affine: v.affine,
    })
}

fn write_cached(path: &Path, p: &Prepared) -> Result<()> {
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d).with_context(|| format!("cannot create cache folder {}", d.display()))?;
    }
    let mut b = Vec::with_capacity(64 + p.image.data.len() * 4);
    b.extend_from_slice(CACHE_MAGIC);
    for v in p.image.shape.iter().chain([&p.image.channels, &(p.labels.is_some() as usize)]) {
        b.extend_from_slice(&(*v as u64).to_le_bytes());
    }
    for v in p.image.affine.0.iter().flatten() {
        b.extend_from_slice(&v.to_le_bytes());
    }
    for v in &p.image.data {
        b.extend_from_slice(&v.to_le_bytes());
    }
    if let Some(l) = &p.labels {
        b.extend_from_slice(&l.data);
    }
    atomic_write(path, &b)
}

fn read_cached(path: &Path) -> Result<Prepared> {
    let b = std::fs::read(path)?;
    ensure!(b.len() >= 8 + 40 + 128 && &b[..8] == CACHE_MAGIC, "not a cache file");
    let u = |i: usize| u64::from_le_bytes(b[8 + 8 * i..16 + 8 * i].try_into().unwrap_or_default()) as usize;
    let shape = [u(0), u(1), u(2)];
    let (channels, labelled) = (u(3), u(4) == 1);
    let mut affine = [[0.0; 4]; 4];
    for (n, v) in affine.iter_mut().flatten().enumerate() {
        *v = f64::from_le_bytes(b[48 + 8 * n..56 + 8 * n].try_into().unwrap_or_default());
    }
    let voxels =
        shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).context("cache header is corrupt")?;
    let start = 176;
    let end = voxels.checked_mul(channels).and_then(|n| n.checked_mul(4)).and_then(|n| n.checked_add(start));
    let end = end.context("cache header is corrupt")?;
    ensure!(
        Some(b.len()) == end.checked_add(if labelled { voxels } else { 0 }),
        "cache file has the wrong length"
    );
    let data = b[start..end].chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    let affine = Affine(affine);
    let labels = labelled.then(|| Volume::new(b[end..].to_vec(), shape, affine));
    Ok(Prepared { image: Volume { data, shape, channels, affine }, labels })
}

/// Samples made ahead of use by worker threads, yielded in index order.
pub struct Prefetcher<T> {
    rx: Receiver<(usize, Result<T>)>,
    pending: BTreeMap<usize, Result<T>>,
    next: usize,
    count: usize,
}

impl<T: Send + 'static> Prefetcher<T> {
    /// Makes samples `0..count` with `make(index, rng)` on `workers` threads, at most `depth`
    /// ahead of the consumer. Sample `i` always gets `Rng::for_item(seed, i)`, so results do not
    /// depend on which thread made them.
    pub fn new<F>(count: usize, workers: usize, depth: usize, seed: u64, make: F) -> Self
    where
        F: Fn(usize, &mut Rng) -> Result<T> + Send + Sync + 'static,
    {
        let (tx, rx) = sync_channel(depth.max(1));
        let make = Arc::new(make);
        let next = Arc::new(AtomicUsize::new(0));
        for _ in 0..workers.max(1) {
            let (tx, make, next) = (tx.clone(), make.clone(), next.clone());
            std::thread::spawn(move || {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= count {
                        break;
                    }
                    let mut rng = Rng::for_item(seed, i as u64);
                    if tx.send((i, make(i, &mut rng))).is_err() {
                        break; // the consumer is gone
                    }
                }
            });
        }
        Self { rx, pending: BTreeMap::new(), next: 0, count }
    }
}

impl<T> Iterator for Prefetcher<T> {
    type Item = Result<T>;

    fn next(&mut self) -> Option<Result<T>> {
        if self.next >= self.count {
            return None;
        }
        while !self.pending.contains_key(&self.next) {
            match self.rx.recv() {
                Ok((i, item)) => {
                    self.pending.insert(i, item);
                }
                Err(_) => return Some(Err(anyhow!("sample workers stopped before sample {}", self.next))),
            }
        }
        let item = self.pending.remove(&self.next);
        self.next += 1;
        item
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefetch_order_and_values_do_not_depend_on_threads() {
        let run = |workers| {
            Prefetcher::new(50, workers, 4, 7, |i, rng| {
                // Uneven work so threads finish out of order.
                std::thread::sleep(std::time::Duration::from_micros(((i * 37) % 11) as u64 * 50));
                Ok((i, rng.uniform()))
            })
            .collect::<Result<Vec<_>>>()
            .unwrap()
        };
        let one = run(1);
        assert_eq!(one, run(3));
        assert!(one.iter().enumerate().all(|(n, (i, _))| n == *i));
    }

    #[test]
    fn prefetch_passes_errors_through() {
        let mut p =
            Prefetcher::new(3, 2, 2, 0, |i, _| if i == 1 { Err(anyhow!("bad sample {i}")) } else { Ok(i) });
        assert_eq!(p.next().unwrap().unwrap(), 0);
        assert!(p.next().unwrap().unwrap_err().to_string().contains("bad sample 1"));
        assert_eq!(p.next().unwrap().unwrap(), 2);
        assert!(p.next().is_none());
    }
}
