/// Plain command-line parsing: positionals, `--name value` options and `--flag` switches, each
/// checked against what the command declares, so a typo is an error and not a silent default.
struct ParsedArguments {
    private(set) var positionals: [String] = []
    private var values: [String: String] = [:]
    private var flags: Set<String> = []

    init(_ arguments: [String], options: Set<String>, flags allowedFlags: Set<String>) throws {
        var index = 0
        while index < arguments.count {
            let argument = arguments[index]
            index += 1
            guard argument.hasPrefix("--"), argument.count > 2 else {
                positionals.append(argument)
                continue
            }
            let name = String(argument.dropFirst(2))
            if allowedFlags.contains(name) {
                flags.insert(name)
            } else if options.contains(name) {
                guard index < arguments.count else { throw UsageError("--\(name) needs a value") }
                values[name] = arguments[index]
                index += 1
            } else {
                throw UsageError("unknown option --\(name)")
            }
        }
    }

    func has(_ flag: String) -> Bool { flags.contains(flag) }

    /// Whether the option or flag `name` was given at all.
    func given(_ name: String) -> Bool { flags.contains(name) || values[name] != nil }

    func string(_ name: String) -> String? { values[name] }

    func int(_ name: String) throws -> Int? {
        try values[name].map { text in
            guard let value = Int(text) else { throw UsageError("--\(name) must be an integer, got \(text)") }
            return value
        }
    }

    func float(_ name: String) throws -> Float? {
        try values[name].map { text in
            guard let value = Float(text), value.isFinite else { throw UsageError("--\(name) must be a number, got \(text)") }
            return value
        }
    }

    /// The one positional argument a command takes (its text or prompt).
    func single(_ what: String) throws -> String {
        guard positionals.count == 1 else {
            throw UsageError(positionals.isEmpty ? "missing the \(what)" : "expected one \(what), got \(positionals.count) arguments; quote it")
        }
        return positionals[0]
    }
}

/// A mistake in how the tool was called; printed with the usage and exit status 2.
struct UsageError: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}
