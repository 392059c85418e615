//! Generation numbers: the fencing token carried by every cluster-data decision.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A monotonically increasing version number. Cluster data, each database spec and the proxy
/// section carry their own; a component acknowledges the one it has applied, so a writer can
/// tell "has seen my decision" from "has not yet".
#[derive(
    Copy, Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Generation(pub u64);

impl Generation {
    /// Nothing applied yet.
    pub const NONE: Generation = Generation(0);
    /// The first generation written.
    pub const INITIAL: Generation = Generation(1);

    /// The generation after this one.
    #[must_use]
    pub fn next(self) -> Generation {
        Generation(self.0.saturating_add(1))
    }
}

impl fmt::Display for Generation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}
