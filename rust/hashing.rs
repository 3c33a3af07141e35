//! File hashes users already know (AutoV1/V2/V3), computed reading each file once.
