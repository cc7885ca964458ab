/// How a flow block's package keeps its KV cache.
///
/// `shared`: one Core ML state made by one function and used by all of them (prefill, step_1,
/// step_16), coremltools' prefill/decode pattern, which Apple does not document as supported.
/// `cacheIO`: the export's fallback twins (`--state-fallback`), each taking the caches as inputs
/// and returning them updated, so no state is shared (slower: the caches travel with every call).
public enum StateMode: String, Sendable {
    case shared
    case cacheIO

    /// `shared` when `probeShared` (one call on a state another function made) succeeds; else
    /// `cacheIO` if the block has the twins; else an error that says how to export them.
    public static func select(for block: ExportManifest.Block, probeShared: () throws -> Void) throws -> StateMode {
        do {
            try probeShared()
            return .shared
        } catch {
            guard block.cacheIO != nil else {
                throw StarFlowError.coreMLFailure(path: block.package, message: "this device refuses one state shared by the block's functions (\(error)); export again with --state-fallback")
            }
            return .cacheIO
        }
    }
}
