// Generated from realm_nb/limits.py by `realm-nb build-guest`: do not edit.
// The guest refuses a request whose values this table does not admit.

pub const MAX_CANDIDATES: usize = 512;
pub const MAX_VOCAB: u32 = 16777216;

pub fn maxTokensOk(v: u32) bool {
    _ = v;
    return true;
}
pub fn topKOk(v: u32) bool {
    _ = v;
    return true;
}
pub fn temperatureOk(v: f32) bool {
    return v >= 0.0 and v <= 100.0;
}
pub fn topPOk(v: f32) bool {
    return v > 0.0 and v <= 1.0;
}
pub fn minPOk(v: f32) bool {
    return v >= 0.0 and v <= 1.0;
}
pub fn repeatPenaltyOk(v: f32) bool {
    return v > 0.0 and v <= 10.0;
}
pub fn repeatWindowOk(v: u32) bool {
    return v >= 0 and v <= 4096;
}
