//! The kernel table: which implementation of each kernel this process runs, chosen once.
//!
//! As in tract-linalg, the CPU's features are detected once (the first time a table is asked
//! for, cached for the process) and the choice travels with the model ([`KernelTable`], held by
//! [`super::FastUnetr`]) down to every kernel call, so no hot path tests the CPU again. A kernel
//! set is a checked token ([`F32Kernels`], [`Int8Kernels`]): the only ways to get one check
//! that this CPU runs it, so a kernel handed a SIMD token may call its `#[target_feature]` code
//! without looking again. Tests build one token per set the CPU has ([`F32Kernels::all`],
//! [`Int8Kernels::all`]) and compare each with the portable one.

use std::sync::OnceLock;

/// The f32 kernel implementations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    /// Portable Rust (autovectorised for the build target).
    Scalar,
    /// x86_64 AVX2 + FMA intrinsics.
    Avx2Fma,
    /// x86_64 AVX-512 F for the GEMM micro-kernel (12 rows of one 512-bit register each), the
    /// AVX2 + FMA code for the rest (the Winograd transforms compiled with AVX-512 VL too, for
    /// its 32 registers). Requires AVX-512 F and VL.
    Avx512,
    /// aarch64 NEON (Advanced SIMD) intrinsics: the GEMM micro-kernel and the Winograd
    /// transforms (the elementwise code is the portable loop, which NEON vectorises).
    Neon,
}

impl Isa {
    /// The fastest set this CPU supports (detected once per process).
    pub fn detect() -> Self {
        KernelTable::detect().f32.isa()
    }

    /// Whether this CPU can run it.
    pub fn supported(self) -> bool {
        F32Kernels::new(self).is_some()
    }
}

/// The int8 kernel implementations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QIsa {
    /// Portable integer Rust.
    Scalar,
    /// x86_64 AVX-512 VNNI on 256-bit registers (`avx512vnni` + `avx512vl`, with AVX2 and FMA
    /// for the integer Winograd kernel's f32 transforms).
    Vnni,
    /// aarch64 NEON widening multiplies of the i16 levels (`smull`, no extension needed; the
    /// integer Winograd kernel transforms with the NEON f32 kernels).
    Neon,
}

impl QIsa {
    /// The SIMD integer kernels when the CPU has them (VNNI, NEON; detected once per process).
    pub fn detect() -> Option<Self> {
        Some(KernelTable::detect().int8.qisa()).filter(|&q| q != QIsa::Scalar)
    }

    /// Whether this CPU can run it.
    pub fn supported(self) -> bool {
        Int8Kernels::new(self).is_some()
    }
}

/// The bf16 kernel implementations (the bf16 mode's Winograd products).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BIsa {
    /// Portable Rust computing what `vdpbf16ps` specifies.
    Scalar,
    /// x86_64 AVX-512 BF16 (`vdpbf16ps` on 512-bit registers; with AVX2 and FMA for the
    /// Winograd transforms).
    Avx512Bf16,
}

impl BIsa {
    /// Whether this CPU can run it.
    pub fn supported(self) -> bool {
        Bf16Kernels::new(self).is_some()
    }
}

/// What this CPU has, tested once.
#[derive(Clone, Copy, Debug)]
struct Features {
    avx2_fma: bool,
    /// AVX-512 F and VL, and AVX2 + FMA (VL lets the AVX2 code use all 32 vector registers).
    avx512f: bool,
    /// AVX-512 VNNI and VL, and AVX2 + FMA (which every such CPU has; checked so that
    /// [`Int8Kernels::f32_transforms`] may rely on it).
    vnni: bool,
    /// AVX-512 F and BF16, and AVX2 + FMA (for [`Bf16Kernels::f32_transforms`]).
    avx512_bf16: bool,
    /// aarch64 Advanced SIMD with FMA.
    neon: bool,
}

impl Features {
    /// The process's features: detected on the first call only.
    fn get() -> Features {
        static FEATURES: OnceLock<Features> = OnceLock::new();
        *FEATURES.get_or_init(Self::detect)
    }

    #[cfg(target_arch = "x86_64")]
    fn detect() -> Features {
        use std::arch::is_x86_feature_detected as has;
        let avx2_fma = has!("avx2") && has!("fma");
        Features {
            avx2_fma,
            avx512f: avx2_fma && has!("avx512f") && has!("avx512vl"),
            vnni: avx2_fma && has!("avx512vnni") && has!("avx512vl"),
            avx512_bf16: avx2_fma && has!("avx512f") && has!("avx512bf16"),
            neon: false,
        }
    }

    #[cfg(target_arch = "aarch64")]
    fn detect() -> Features {
        let neon = std::arch::is_aarch64_feature_detected!("neon");
        Features { avx2_fma: false, avx512f: false, vnni: false, avx512_bf16: false, neon }
    }

    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    fn detect() -> Features {
        Features { avx2_fma: false, avx512f: false, vnni: false, avx512_bf16: false, neon: false }
    }
}

/// An f32 kernel set this CPU runs. Holding one is the proof the SIMD kernels rely on: it can
/// only be made by [`Self::new`] (which checks the CPU), [`Self::best`] and [`Self::PORTABLE`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct F32Kernels(Isa);

impl F32Kernels {
    /// The portable kernels, which every CPU runs.
    pub const PORTABLE: Self = Self(Isa::Scalar);

    /// `isa`'s kernels, if this CPU runs them.
    pub fn new(isa: Isa) -> Option<Self> {
        match isa {
            Isa::Scalar => Some(Self::PORTABLE),
            Isa::Avx2Fma => Features::get().avx2_fma.then_some(Self(isa)),
            Isa::Avx512 => Features::get().avx512f.then_some(Self(isa)),
            Isa::Neon => Features::get().neon.then_some(Self(isa)),
        }
    }

    /// The fastest set this CPU runs.
    pub fn best() -> Self {
        [Isa::Avx512, Isa::Avx2Fma, Isa::Neon].into_iter().find_map(Self::new).unwrap_or(Self::PORTABLE)
    }

    /// Every set this CPU runs, the portable one first (for tests that compare them).
    pub fn all() -> Vec<Self> {
        [Isa::Scalar, Isa::Avx2Fma, Isa::Avx512, Isa::Neon].into_iter().filter_map(Self::new).collect()
    }

    /// Which implementation.
    pub fn isa(self) -> Isa {
        self.0
    }

    /// Whether the AVX2 + FMA code may run (the AVX2 set and the AVX-512 one, which includes it).
    pub fn avx2(self) -> bool {
        matches!(self.0, Isa::Avx2Fma | Isa::Avx512)
    }
}

/// An int8 kernel set this CPU runs; like [`F32Kernels`], only made after checking the CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Int8Kernels(QIsa);

impl Int8Kernels {
    /// The portable integer kernels, which every CPU runs.
    pub const PORTABLE: Self = Self(QIsa::Scalar);

    /// `qisa`'s kernels, if this CPU runs them.
    pub fn new(qisa: QIsa) -> Option<Self> {
        match qisa {
            QIsa::Scalar => Some(Self::PORTABLE),
            QIsa::Vnni => Features::get().vnni.then_some(Self(qisa)),
            QIsa::Neon => Features::get().neon.then_some(Self(qisa)),
        }
    }

    /// The fastest set this CPU runs.
    pub fn best() -> Self {
        [QIsa::Vnni, QIsa::Neon].into_iter().find_map(Self::new).unwrap_or(Self::PORTABLE)
    }

    /// Every set this CPU runs, the portable one first.
    pub fn all() -> Vec<Self> {
        [QIsa::Scalar, QIsa::Vnni, QIsa::Neon].into_iter().filter_map(Self::new).collect()
    }

    /// Which implementation.
    pub fn qisa(self) -> QIsa {
        self.0
    }

    /// The f32 kernels the integer Winograd kernel transforms with: AVX2 + FMA with VNNI (whose
    /// detection includes them), portable with the portable integer kernels, so that each
    /// integer set always pairs with the same transforms.
    pub fn f32_transforms(self) -> F32Kernels {
        match self.0 {
            QIsa::Scalar => F32Kernels::PORTABLE,
            // Not `F32Kernels::new`: a VNNI token exists only where AVX2 and FMA were found.
            QIsa::Vnni => F32Kernels(Isa::Avx2Fma),
            // A NEON token exists only where NEON was found.
            QIsa::Neon => F32Kernels(Isa::Neon),
        }
    }
}

/// A bf16 kernel set this CPU runs; like [`F32Kernels`], only made after checking the CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bf16Kernels(BIsa);

impl Bf16Kernels {
    /// The portable bf16 kernels, which every CPU runs.
    pub const PORTABLE: Self = Self(BIsa::Scalar);

    /// `bisa`'s kernels, if this CPU runs them.
    pub fn new(bisa: BIsa) -> Option<Self> {
        match bisa {
            BIsa::Scalar => Some(Self::PORTABLE),
            BIsa::Avx512Bf16 => Features::get().avx512_bf16.then_some(Self(bisa)),
        }
    }

    /// The fastest set this CPU runs.
    pub fn best() -> Self {
        Self::new(BIsa::Avx512Bf16).unwrap_or(Self::PORTABLE)
    }

    /// Every set this CPU runs, the portable one first.
    pub fn all() -> Vec<Self> {
        [BIsa::Scalar, BIsa::Avx512Bf16].into_iter().filter_map(Self::new).collect()
    }

    /// Which implementation.
    pub fn bisa(self) -> BIsa {
        self.0
    }

    /// The f32 kernels the bf16 Winograd kernel transforms with: AVX2 + FMA with AVX-512 BF16
    /// (whose detection includes them), portable with the portable bf16 kernels, so that each
    /// bf16 set always pairs with the same transforms.
    pub fn f32_transforms(self) -> F32Kernels {
        match self.0 {
            BIsa::Scalar => F32Kernels::PORTABLE,
            // Not `F32Kernels::new`: an AVX-512 BF16 token exists only where AVX2 and FMA were found.
            BIsa::Avx512Bf16 => F32Kernels(Isa::Avx2Fma),
        }
    }
}

/// The kernels a model runs: the f32, int8 and bf16 sets, each checked against this CPU when
/// the table is made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelTable {
    /// Every f32 product, transform and elementwise kernel.
    pub f32: F32Kernels,
    /// The integer convolutions (used only where the policy picks them).
    pub int8: Int8Kernels,
    /// The bf16 Winograd products (used only in the bf16 mode).
    pub bf16: Bf16Kernels,
}

impl KernelTable {
    /// The fastest of each set this CPU runs (the CPU is tested once per process).
    pub fn detect() -> Self {
        Self { f32: F32Kernels::best(), int8: Int8Kernels::best(), bf16: Bf16Kernels::best() }
    }

    /// The portable kernels only.
    pub fn portable() -> Self {
        Self { f32: F32Kernels::PORTABLE, int8: Int8Kernels::PORTABLE, bf16: Bf16Kernels::PORTABLE }
    }
}

/// `$m!(name, kernels)` for each f32 kernel set: `kernels` an `Option<F32Kernels>`, `None` where
/// this CPU lacks the set (its tests then pass without running). Conformance tests use it to
/// generate one module of tests per implementation.
#[cfg(test)]
macro_rules! for_each_f32_kernels {
    ($m:ident) => {
        $m!(portable, Some($crate::fast::kernels::F32Kernels::PORTABLE));
        $m!(avx2_fma, $crate::fast::kernels::F32Kernels::new($crate::fast::kernels::Isa::Avx2Fma));
        $m!(avx512, $crate::fast::kernels::F32Kernels::new($crate::fast::kernels::Isa::Avx512));
        $m!(neon, $crate::fast::kernels::F32Kernels::new($crate::fast::kernels::Isa::Neon));
    };
}
#[cfg(test)]
pub(crate) use for_each_f32_kernels;

/// [`for_each_f32_kernels`] for the int8 kernel sets.
#[cfg(test)]
macro_rules! for_each_int8_kernels {
    ($m:ident) => {
        $m!(portable, Some($crate::fast::kernels::Int8Kernels::PORTABLE));
        $m!(vnni, $crate::fast::kernels::Int8Kernels::new($crate::fast::kernels::QIsa::Vnni));
        $m!(neon, $crate::fast::kernels::Int8Kernels::new($crate::fast::kernels::QIsa::Neon));
    };
}
#[cfg(test)]
pub(crate) use for_each_int8_kernels;

/// [`for_each_f32_kernels`] for the bf16 kernel sets.
#[cfg(test)]
macro_rules! for_each_bf16_kernels {
    ($m:ident) => {
        $m!(portable, Some($crate::fast::kernels::Bf16Kernels::PORTABLE));
        $m!(avx512_bf16, $crate::fast::kernels::Bf16Kernels::new($crate::fast::kernels::BIsa::Avx512Bf16));
    };
}
#[cfg(test)]
pub(crate) use for_each_bf16_kernels;

#[cfg(test)]
mod tests {
    use super::*;

    /// Tokens exist exactly for the sets the CPU runs, and the detected table is the best of each.
    #[test]
    fn tokens_only_for_supported_sets() {
        let table = KernelTable::detect();
        assert_eq!(table.f32, F32Kernels::best());
        assert_eq!(table.int8, Int8Kernels::best());
        assert_eq!(F32Kernels::all()[0], F32Kernels::PORTABLE);
        assert_eq!(Int8Kernels::all()[0], Int8Kernels::PORTABLE);
        assert_eq!(
            F32Kernels::all().len(),
            1 + [Isa::Avx2Fma, Isa::Avx512, Isa::Neon].iter().filter(|i| i.supported()).count()
        );
        // NEON is part of every aarch64 Linux target.
        assert_eq!(Isa::Neon.supported(), cfg!(target_arch = "aarch64"));
        // AVX-512 runs the AVX2 + FMA code besides its own, so it may only exist where they do.
        assert!(!Isa::Avx512.supported() || Isa::Avx2Fma.supported());
        assert_eq!(
            Int8Kernels::all().len(),
            1 + usize::from(QIsa::Vnni.supported()) + usize::from(QIsa::Neon.supported())
        );
        // VNNI transforms with AVX2 + FMA, so it may only exist where they do.
        if let Some(v) = Int8Kernels::new(QIsa::Vnni) {
            assert_eq!(F32Kernels::new(Isa::Avx2Fma), Some(v.f32_transforms()));
        }
        assert_eq!(table.bf16, Bf16Kernels::best());
        assert_eq!(Bf16Kernels::all().len(), 1 + usize::from(BIsa::Avx512Bf16.supported()));
        if let Some(b) = Bf16Kernels::new(BIsa::Avx512Bf16) {
            assert_eq!(F32Kernels::new(Isa::Avx2Fma), Some(b.f32_transforms()));
        }
        assert_eq!(KernelTable::portable().f32.isa(), Isa::Scalar);
    }
}
