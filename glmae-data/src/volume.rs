//! A volume on a voxel grid placed in world space by an affine.

/// Voxel `(i, j, k, 1)` to world millimetres (NIfTI's RAS+ scanner space), row-major 4x4.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Affine(pub [[f64; 4]; 4]);

impl Affine {
    /// Axis-aligned voxels of `spacing` mm with the origin at voxel 0.
    pub fn from_spacing(spacing: [f64; 3]) -> Self {
        let mut m = [[0.0; 4]; 4];
        for (a, s) in spacing.iter().enumerate() {
            m[a][a] = *s;
        }
        m[3][3] = 1.0;
        Self(m)
    }

    /// Voxel size along each array axis: the length of each column of the 3x3 part.
    pub fn spacing(&self) -> [f64; 3] {
        std::array::from_fn(|c| (0..3).map(|r| self.0[r][c].powi(2)).sum::<f64>().sqrt())
    }

    /// World position of a (possibly fractional) voxel index.
    pub fn apply(&self, ijk: [f64; 3]) -> [f64; 3] {
        std::array::from_fn(|r| (0..3).map(|c| self.0[r][c] * ijk[c]).sum::<f64>() + self.0[r][3])
    }

    /// The product `self * other` (apply `other` first).
    pub fn compose(&self, other: &Affine) -> Affine {
        let mut m = [[0.0; 4]; 4];
        for (r, row) in m.iter_mut().enumerate() {
            for (c, v) in row.iter_mut().enumerate() {
                *v = (0..4).map(|k| self.0[r][k] * other.0[k][c]).sum();
            }
        }
        Affine(m)
    }

    /// For each array axis, the world axis (0 = x/R-L, 1 = y/A-P, 2 = z/S-I) it runs closest to
    /// and the direction (+1 toward R, A, S). Assigns greedily by the largest remaining
    /// component, as nibabel's `io_orientation` does for non-degenerate affines.
    pub fn orientation(&self) -> [(usize, f64); 3] {
        let sp = self.spacing();
        let mut out = [(0usize, 1.0f64); 3];
        let mut used_world = [false; 3];
        let mut used_axis = [false; 3];
        for _ in 0..3 {
            // Start from an unused pair, so that a degenerate affine (a zero, NaN or repeated
            // column) still gives a permutation instead of two axes on one world axis.
            let first = |used: &[bool; 3]| used.iter().position(|u| !u).unwrap_or(0);
            let mut best = (-1.0f64, first(&used_world), first(&used_axis));
            for (c, &axis_used) in used_axis.iter().enumerate() {
                for (r, &world_used) in used_world.iter().enumerate() {
                    let v = (self.0[r][c] / sp[c].max(f64::MIN_POSITIVE)).abs();
                    if !axis_used && !world_used && v > best.0 {
                        best = (v, r, c);
                    }
                }
            }
            let (_, r, c) = best;
            used_world[r] = true;
            used_axis[c] = true;
            out[c] = (r, self.0[r][c].signum());
        }
        out
    }

    /// Axis codes such as `"LPS"` or `"RAS"`: the world direction each array axis increases toward.
    pub fn axcodes(&self) -> String {
        self.orientation()
            .iter()
            .map(|&(w, sign)| match (w, sign >= 0.0) {
                (0, true) => 'R',
                (0, false) => 'L',
                (1, true) => 'A',
                (1, false) => 'P',
                (_, true) => 'S',
                (_, false) => 'I',
            })
            .collect()
    }
}

/// Channels of a 3-D image: `data[((c * shape[0] + i) * shape[1] + j) * shape[2] + k]`.
/// Images hold `f32`; label maps hold `u8`.
#[derive(Clone, Debug, PartialEq)]
pub struct Volume<T = f32> {
    /// Values, channel-first, last axis fastest.
    pub data: Vec<T>,
    /// Voxels along each array axis.
    pub shape: [usize; 3],
    /// Number of channels (a 4-D NIfTI's fourth dimension).
    pub channels: usize,
    /// Where the grid sits in world space.
    pub affine: Affine,
}

/// A label map: one `u8` class index per voxel.
pub type Labels = Volume<u8>;

impl<T> Volume<T> {
    /// A single-channel volume; `data` must hold `shape` voxels.
    pub fn new(data: Vec<T>, shape: [usize; 3], affine: Affine) -> Self {
        debug_assert_eq!(data.len(), shape.iter().product::<usize>());
        Self { data, shape, channels: 1, affine }
    }

    /// Flat index of voxel `(i, j, k)` in channel 0.
    #[inline]
    pub fn index(&self, i: usize, j: usize, k: usize) -> usize {
        (i * self.shape[1] + j) * self.shape[2] + k
    }

    /// Voxels per channel.
    pub fn voxels(&self) -> usize {
        self.shape.iter().product()
    }

    /// One channel's values.
    pub fn channel(&self, c: usize) -> &[T] {
        let n = self.voxels();
        &self.data[c * n..(c + 1) * n]
    }

    /// Voxel spacing in mm from the affine.
    pub fn spacing(&self) -> [f64; 3] {
        self.affine.spacing()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn axcodes_follow_the_affine() {
        assert_eq!(Affine::from_spacing([1.0, 2.0, 3.0]).axcodes(), "RAS");
        // DICOM-style LPS with a slight obliquity.
        let lps = Affine([
            [-0.7, 0.01, 0.0, 10.0],
            [0.0, -0.7, 0.02, 5.0],
            [0.0, 0.0, 2.5, -3.0],
            [0.0, 0.0, 0.0, 1.0],
        ]);
        assert_eq!(lps.axcodes(), "LPS");
        // Axes permuted: array axis 0 runs along z.
        let perm =
            Affine([[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, -1.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]]);
        assert_eq!(perm.axcodes(), "SRP");
        let s = lps.spacing();
        assert!(
            (s[0] - 0.7).abs() < 1e-9 && (s[2] - (2.5f64.powi(2) + 0.02f64.powi(2)).sqrt()).abs() < 1e-12
        );
    }

    /// A degenerate affine (zero or NaN columns, found by the `preprocess_geometry` fuzz target)
    /// still maps the three array axes to three distinct world axes: reorienting it used to map
    /// two axes onto one and lose voxels.
    #[test]
    fn degenerate_affines_give_a_permutation() {
        for a in [
            Affine([[0.0; 4], [0.0; 4], [0.0; 4], [0.0, 0.0, 0.0, 1.0]]),
            Affine([
                [1.0, 1.0, 0.0, 0.0],
                [0.0, 0.0, 0.0, 0.0],
                [0.0, 0.0, f64::NAN, 0.0],
                [0.0, 0.0, 0.0, 1.0],
            ]),
        ] {
            let mut worlds: Vec<usize> = a.orientation().iter().map(|&(w, _)| w).collect();
            worlds.sort();
            assert_eq!(worlds, [0, 1, 2], "{a:?}");
        }
    }
}
