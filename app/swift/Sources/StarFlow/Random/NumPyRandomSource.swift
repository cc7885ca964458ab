import Foundation

/// NumPy's legacy generator, `numpy.random.RandomState(seed)`, bit for bit: MT19937 seeded with
/// `init_genrand`, doubles from two 32-bit draws (53 bits), and Gaussians from the polar
/// Box–Muller method that keeps its second value for the next call. The same seed therefore
/// gives the same noise in Python and Swift.
public struct NumPyRandomSource: Sendable {
    private static let stateSize = 624
    private static let shift = 397

    private var state: [UInt32]
    private var index: Int
    private var cachedGaussian: Double?

    public init(seed: UInt32) {
        var state = [UInt32](repeating: 0, count: Self.stateSize)
        state[0] = seed
        for i in 1..<Self.stateSize {
            state[i] = 1_812_433_253 &* (state[i - 1] ^ (state[i - 1] >> 30)) &+ UInt32(i)
        }
        self.state = state
        index = Self.stateSize
    }

    /// The next raw 32-bit output of MT19937.
    public mutating func nextUInt32() -> UInt32 {
        if index >= Self.stateSize { twist() }
        var y = state[index]
        index += 1
        y ^= y >> 11
        y ^= (y << 7) & 0x9D2C_5680
        y ^= (y << 15) & 0xEFC6_0000
        y ^= y >> 18
        return y
    }

    /// A double in [0, 1) with 53 random bits (NumPy's `random_sample`).
    public mutating func nextDouble() -> Double {
        let high = Double(nextUInt32() >> 5)
        let low = Double(nextUInt32() >> 6)
        return (high * 67_108_864.0 + low) / 9_007_199_254_740_992.0
    }

    /// One standard normal draw (NumPy's legacy `gauss`).
    public mutating func nextGaussian() -> Double {
        if let cached = cachedGaussian {
            cachedGaussian = nil
            return cached
        }
        var x1 = 0.0, x2 = 0.0, radius = 0.0
        repeat {
            x1 = 2 * nextDouble() - 1
            x2 = 2 * nextDouble() - 1
            radius = x1 * x1 + x2 * x2
        } while radius >= 1 || radius == 0
        let factor = (-2 * Foundation.log(radius) / radius).squareRoot()
        cachedGaussian = factor * x1
        return factor * x2
    }

    /// `RandomState(seed).standard_normal(count)` cast to Float32, in C order.
    public mutating func standardNormal(count: Int) -> [Float] {
        (0..<count).map { _ in Float(nextGaussian()) }
    }

    /// Noise of `shape` (NCHW) as the MLX runtime draws it for one image.
    public static func noise(seed: UInt32, shape: [Int]) -> Tensor {
        var source = NumPyRandomSource(seed: seed)
        return Tensor(shape: shape, values: source.standardNormal(count: shape.reduce(1, *)))
    }

    private mutating func twist() {
        let upper: UInt32 = 0x8000_0000, lower: UInt32 = 0x7FFF_FFFF, matrix: UInt32 = 0x9908_B0DF
        for i in 0..<Self.stateSize {
            let y = (state[i] & upper) | (state[(i + 1) % Self.stateSize] & lower)
            let mixed = state[(i + Self.shift) % Self.stateSize] ^ (y >> 1)
            state[i] = y & 1 == 1 ? mixed ^ matrix : mixed
        }
        index = 0
    }
}
