import StarFlow

/// Strict weight loading from one safetensors file: every tensor the model asks for must be
/// present with the expected shape, and every tensor in the file must be asked for. Problems are
/// collected and reported together by `finish()`, naming the file.
final class WeightStore {
    private let file: SafeTensorsFile
    private var used: Set<String> = []
    private var missing: [String] = []
    private var shapeProblem: StarFlowError?

    init(file: SafeTensorsFile) {
        self.file = file
    }

    /// The values of `name`, which must have `shape`; zeros stand in until `finish()` reports it.
    func values(_ name: String, shape: [Int]) throws -> [Float] {
        used.insert(name)
        guard let entry = file.entries[name] else {
            missing.append(name)
            return [Float](repeating: 0, count: shape.reduce(1, *))
        }
        guard entry.shape == shape else {
            if shapeProblem == nil {
                shapeProblem = .shapeMismatch(path: file.path, name: name, expected: shape, actual: entry.shape)
            }
            return [Float](repeating: 0, count: shape.reduce(1, *))
        }
        return try file.tensor(name).values
    }

    func finish() throws {
        let unexpected = file.names.filter { !used.contains($0) }
        if !missing.isEmpty || !unexpected.isEmpty {
            throw StarFlowError.weightsMismatch(path: file.path, missing: missing, unexpected: unexpected)
        }
        if let shapeProblem { throw shapeProblem }
    }
}
