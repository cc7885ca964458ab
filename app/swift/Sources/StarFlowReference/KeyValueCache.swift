import StarFlow

/// Keys (after RoPE) and values of one attention layer, (rows, heads, length, head_dim),
/// allocated once per image and written at explicit positions.
struct KeyValueCache {
    let heads: Int
    let length: Int
    let headDim: Int
    var keys: [Float]
    var values: [Float]

    init(rows: Int, heads: Int, length: Int, headDim: Int) {
        self.heads = heads
        self.length = length
        self.headDim = headDim
        keys = [Float](repeating: 0, count: rows * heads * length * headDim)
        values = keys
    }

    /// Offset of (row, head, position) in `keys` and `values`.
    func offset(row: Int, head: Int, position: Int) -> Int {
        ((row * heads + head) * length + position) * headDim
    }
}
