//! A small deterministic generator (SplitMix64) for random weights, inputs and tests.

/// SplitMix64: fast, seedable, good enough for test data and random weights.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed ^ 0x9E37_79B9_7F4A_7C15)
    }

    /// A generator seeded from the clock (fresh data every run); returns the seed too.
    pub fn from_time() -> (Self, u64) {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0x1234_5678);
        (Rng::new(seed), seed)
    }

    /// A generator for one test: seeded from `LKCONV_SEED` when set (to replay a failure),
    /// else from the clock (fresh data every run); the seed is printed on stderr either way.
    pub fn for_test(test: &str) -> Self {
        let seed = std::env::var("LKCONV_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| Rng::from_time().1);
        eprintln!("{test}: seed {seed} (LKCONV_SEED={seed} replays it)");
        Rng::new(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Uniform in [-1, 1).
    pub fn uniform_pm1(&mut self) -> f32 {
        self.uniform() * 2.0 - 1.0
    }

    /// Uniform integer in [lo, hi].
    pub fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + (self.next_u64() % ((hi - lo + 1) as u64)) as usize
    }

    /// A vector of uniform values in [-1, 1).
    pub fn vec_pm1(&mut self, len: usize) -> Vec<f32> {
        (0..len).map(|_| self.uniform_pm1()).collect()
    }
}
