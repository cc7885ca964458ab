/// Latents (B, C, H, W) ↔ token sequences (B, N, C·p²), N = (H/p)(W/p) in raster order,
/// packing each p×p patch as `c (h p1) (w p2) -> h w (p1 p2 c)`, as the official patchify.
public struct TokenLayout: Equatable, Sendable {
    public let channels: Int
    public let height: Int
    public let width: Int
    public let patchSize: Int

    public init(channels: Int, height: Int, width: Int, patchSize: Int) throws {
        guard channels > 0, patchSize > 0, height > 0, width > 0, height % patchSize == 0, width % patchSize == 0 else {
            throw StarFlowError.invalidArgument("a \(channels)×\(height)×\(width) latent cannot be cut into \(patchSize)×\(patchSize) patches")
        }
        self.channels = channels
        self.height = height
        self.width = width
        self.patchSize = patchSize
    }

    public var gridHeight: Int { height / patchSize }
    public var gridWidth: Int { width / patchSize }
    public var tokenCount: Int { gridHeight * gridWidth }
    public var tokenChannels: Int { channels * patchSize * patchSize }

    /// (B, C, H, W) → (B, N, C·p²) values in raster order.
    public func tokens(from latent: Tensor) -> [Float] {
        var tokens = [Float](repeating: 0, count: latent.count)
        forEachElement(batch: latent.shape[0]) { latentIndex, tokenIndex in
            tokens[tokenIndex] = latent.values[latentIndex]
        }
        return tokens
    }

    /// (B, N, C·p²) raster-order values → (B, C, H, W).
    public func latent(from tokens: [Float], batch: Int) -> Tensor {
        var values = [Float](repeating: 0, count: tokens.count)
        forEachElement(batch: batch) { latentIndex, tokenIndex in
            values[latentIndex] = tokens[tokenIndex]
        }
        return Tensor(shape: [batch, channels, height, width], values: values)
    }

    /// Raster order ↔ a flipped block's order (reversing the tokens is its own inverse).
    public func ordered(_ tokens: [Float], rows: Int, flipped: Bool) -> [Float] {
        guard flipped else { return tokens }
        let width = tokenChannels, count = tokenCount
        var reversed = [Float](repeating: 0, count: tokens.count)
        for row in 0..<rows {
            for token in 0..<count {
                let source = (row * count + token) * width
                let target = (row * count + count - 1 - token) * width
                reversed[target..<(target + width)] = tokens[source..<(source + width)]
            }
        }
        return reversed
    }

    private func forEachElement(batch: Int, _ body: (_ latentIndex: Int, _ tokenIndex: Int) -> Void) {
        let p = patchSize
        for b in 0..<batch {
            for c in 0..<channels {
                for y in 0..<height {
                    for x in 0..<width {
                        let token = (y / p) * gridWidth + x / p
                        let channel = ((y % p) * p + x % p) * channels + c
                        let latentIndex = ((b * channels + c) * height + y) * width + x
                        body(latentIndex, (b * tokenCount + token) * tokenChannels + channel)
                    }
                }
            }
        }
    }
}
