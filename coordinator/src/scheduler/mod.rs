//! The scheduler library: filters, weighers and the claim transaction.
