/// One autoregressive flow block as the sampler drives it, whatever runs it (the Core ML
/// package of an export, or the plain-Swift reference backend).
///
/// The step contract: after `reset(rows:)` (and, for the deep block, `prefill(text:)`, which
/// fills cache positions 0..<T with the text prefix), `step(tokens:position:)` takes a chunk of
/// *previous* tokens in the block's order — `[sos, x_0, …]` — whose first sits at cache index
/// `position`, and returns each token's soft-clipped scale logit and shift, (rows, n, C·p²).
/// Cache entries are written at explicit positions, so a Jacobi pass simply rewrites its chunk.
public protocol FlowBlock: AnyObject {
    /// The learned start-of-sequence token, `tokenChannels` values in data space.
    var sos: [Float] { get }
    /// Whether the block reads its tokens in reversed raster order.
    var flipped: Bool { get }
    /// Whether the block reads the condition (text states or a one-hot label) as a prefix.
    var hasText: Bool { get }
    /// Channels of one token, C·p².
    var tokenChannels: Int { get }
    /// Tokens of one image, (H/p)·(W/p).
    var tokenCount: Int { get }
    /// The largest chunk one `step` call accepts.
    var maxChunkSize: Int { get }

    /// Starts a new image: an empty cache for `rows` rows (2 per image for the guided deep block).
    func reset(rows: Int) throws
    /// Runs the condition prefix (rows, T, D) through every layer into cache positions 0..<T.
    func prefill(text: Tensor) throws
    /// (scale logit, shift) of each token of a chunk (rows, n, C·p²) starting at cache `position`.
    func step(tokens: Tensor, position: Int) throws -> (scaleLogit: Tensor, shift: Tensor)
}
