//! Deterministic shards of the prompt set, for job arrays and multi-GPU
//! runs: shard `I` of `N` takes the prompts whose position in the full set
//! is `I` modulo `N`. The spec comes from `--shard I/N` or, when absent,
//! from the launcher's environment (Slurm job arrays, Kubernetes Indexed
//! Jobs, torchrun-style `RANK`/`WORLD_SIZE`).

use std::fmt;

use crate::error::{PipelineError, Result};

/// Shard `index` of `count` (0-based).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shard {
    /// This shard, `0..count`.
    pub index: usize,
    /// Number of shards.
    pub count: usize,
}

impl fmt::Display for Shard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

impl Shard {
    /// The whole prompt set.
    pub const ALL: Self = Self { index: 0, count: 1 };

    /// Parses `I/N` (0-based `I < N`).
    pub fn parse(spec: &str) -> Result<Self> {
        let bad = |why: &str| {
            PipelineError::Invalid(format!(
                "shard `{spec}`: {why} (write I/N with 0 <= I < N, e.g. 0/4)"
            ))
        };
        let (i, n) = spec.split_once('/').ok_or_else(|| bad("no `/`"))?;
        let index: usize = i.trim().parse().map_err(|_| bad("I is not a number"))?;
        let count: usize = n.trim().parse().map_err(|_| bad("N is not a number"))?;
        Self::new(index, count).map_err(|_| bad("I must be smaller than N, and N at least 1"))
    }

    /// Checks `index < count`.
    pub fn new(index: usize, count: usize) -> Result<Self> {
        if count == 0 || index >= count {
            return Err(PipelineError::Invalid(format!(
                "shard {index}/{count}: the index must be below the count"
            )));
        }
        Ok(Self { index, count })
    }

    /// The shard from the environment, if a launcher set one:
    /// `SLURM_ARRAY_TASK_ID` with `SLURM_ARRAY_TASK_COUNT` (minus
    /// `SLURM_ARRAY_TASK_MIN` when the array does not start at 0),
    /// `JOB_COMPLETION_INDEX` with `AGFSYNC_SHARD_COUNT` (Kubernetes does
    /// not export the completions count, so the Job spec must), or
    /// `RANK` with `WORLD_SIZE`.
    pub fn from_env(get: impl Fn(&str) -> Option<String>) -> Result<Option<Self>> {
        let num = |k: &str| -> Result<Option<usize>> {
            match get(k) {
                None => Ok(None),
                Some(v) => v.trim().parse().map(Some).map_err(|_| {
                    PipelineError::Invalid(format!(
                        "environment variable {k}=`{v}` is not a number"
                    ))
                }),
            }
        };
        if let (Some(id), Some(n)) = (num("SLURM_ARRAY_TASK_ID")?, num("SLURM_ARRAY_TASK_COUNT")?) {
            let min = num("SLURM_ARRAY_TASK_MIN")?.unwrap_or(0);
            return Self::new(id.saturating_sub(min), n).map(Some);
        }
        if let Some(id) = num("JOB_COMPLETION_INDEX")? {
            let n = num("AGFSYNC_SHARD_COUNT")?.ok_or_else(|| {
                PipelineError::Invalid(
                    "JOB_COMPLETION_INDEX is set but AGFSYNC_SHARD_COUNT is not: set it to the \
                     Indexed Job's completions"
                        .into(),
                )
            })?;
            return Self::new(id, n).map(Some);
        }
        if let (Some(r), Some(n)) = (num("RANK")?, num("WORLD_SIZE")?) {
            return Self::new(r, n).map(Some);
        }
        Ok(None)
    }

    /// Whether the prompt at position `ord` of the full set is this shard's.
    pub fn owns(&self, ord: i64) -> bool {
        ord.rem_euclid(self.count as i64) as usize == self.index
    }

    /// The shard's directory name inside a run (`shards/I-of-N`).
    pub fn dir_name(&self) -> String {
        format!("{}-of-{}", self.index, self.count)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    #[test]
    fn parse_refuses_index_beyond_count() {
        assert_eq!(Shard::parse("1/2").unwrap(), Shard { index: 1, count: 2 });
        for bad in ["3/2", "2/2", "0/0", "a/2", "1", "-1/2"] {
            assert!(Shard::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn environment_of_each_launcher() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(a, _)| *a == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        let s = Shard::from_env(env(&[
            ("SLURM_ARRAY_TASK_ID", "5"),
            ("SLURM_ARRAY_TASK_COUNT", "4"),
            ("SLURM_ARRAY_TASK_MIN", "3"),
        ]))
        .unwrap();
        assert_eq!(s, Some(Shard { index: 2, count: 4 }));
        let s = Shard::from_env(env(&[
            ("JOB_COMPLETION_INDEX", "1"),
            ("AGFSYNC_SHARD_COUNT", "3"),
        ]))
        .unwrap();
        assert_eq!(s, Some(Shard { index: 1, count: 3 }));
        assert!(Shard::from_env(env(&[("JOB_COMPLETION_INDEX", "1")])).is_err());
        let s = Shard::from_env(env(&[("RANK", "0"), ("WORLD_SIZE", "2")])).unwrap();
        assert_eq!(s, Some(Shard { index: 0, count: 2 }));
        assert_eq!(Shard::from_env(env(&[])).unwrap(), None);
        assert!(Shard::from_env(env(&[("RANK", "2"), ("WORLD_SIZE", "2")])).is_err());
    }

    #[test]
    fn shards_partition_the_set() {
        let shards: Vec<Shard> = (0..3).map(|i| Shard::new(i, 3).unwrap()).collect();
        for ord in 0..20 {
            assert_eq!(shards.iter().filter(|s| s.owns(ord)).count(), 1);
        }
    }
}
