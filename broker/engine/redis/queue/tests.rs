//! The Redis queue store against a real `redis-server`.

use super::*;
