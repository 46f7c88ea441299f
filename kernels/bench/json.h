// A small JSON reader (RFC 8259 values; numbers as double) for the plan files of lkbench.
// Errors throw std::runtime_error naming the byte offset.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace lkjson {

struct Value {
    enum Kind { Null, Bool, Number, String, Array, Object } kind = Null;
    bool b = false;
    double num = 0;
    std::string str;
    std::vector<Value> items;
    std::map<std::string, Value> fields;

    bool has(const std::string& k) const { return kind == Object && fields.count(k) > 0; }
    const Value& at(const std::string& k) const {
        auto it = fields.find(k);
        if (kind != Object || it == fields.end()) throw std::runtime_error("missing key \"" + k + "\"");
        return it->second;
    }
    const Value& at(size_t i) const {
        if (kind != Array || i >= items.size()) throw std::runtime_error("index out of range");
        return items[i];
    }
    // An integer (rejects fractions and values outside int64).
    long long integer() const {
        if (kind != Number || num != (double)(long long)num) throw std::runtime_error("expected an integer");
        return (long long)num;
    }
    const std::string& text() const {
        if (kind != String) throw std::runtime_error("expected a string");
        return str;
    }
    bool boolean() const {
        if (kind != Bool) throw std::runtime_error("expected true or false");
        return b;
    }
    bool is_null() const { return kind == Null; }
};

class Parser {
   public:
    explicit Parser(const std::string& s) : s_(s) {}

    // Parses every top-level value: one value, or several separated by whitespace (JSON lines).
    std::vector<Value> all() {
        std::vector<Value> out;
        skip_ws();
        while (pos_ < s_.size()) {
            out.push_back(value(0));
            skip_ws();
        }
        return out;
    }

   private:
    const std::string& s_;
    size_t pos_ = 0;

    [[noreturn]] void fail(const std::string& what) const {
        throw std::runtime_error("JSON: " + what + " at byte " + std::to_string(pos_));
    }
    void skip_ws() {
        while (pos_ < s_.size() && (s_[pos_] == ' ' || s_[pos_] == '\n' || s_[pos_] == '\r' || s_[pos_] == '\t'))
            ++pos_;
    }
    char peek() {
        skip_ws();
        if (pos_ >= s_.size()) fail("unexpected end");
        return s_[pos_];
    }
    void expect(char c) {
        if (peek() != c) fail(std::string("expected '") + c + "'");
        ++pos_;
    }
    bool literal(const char* word) {
        size_t n = std::char_traits<char>::length(word);
        if (s_.compare(pos_, n, word) == 0) {
            pos_ += n;
            return true;
        }
        return false;
    }
    Value value(int depth) {
        if (depth > 64) fail("nesting too deep");
        Value v;
        char c = peek();
        if (c == '{') {
            ++pos_;
            v.kind = Value::Object;
            if (peek() == '}') {
                ++pos_;
                return v;
            }
            for (;;) {
                if (peek() != '"') fail("expected a key");
                std::string k = string_body();
                expect(':');
                v.fields[k] = value(depth + 1);
                c = peek();
                ++pos_;
                if (c == '}') return v;
                if (c != ',') fail("expected ',' or '}'");
            }
        }
        if (c == '[') {
            ++pos_;
            v.kind = Value::Array;
            if (peek() == ']') {
                ++pos_;
                return v;
            }
            for (;;) {
                v.items.push_back(value(depth + 1));
                c = peek();
                ++pos_;
                if (c == ']') return v;
                if (c != ',') fail("expected ',' or ']'");
            }
        }
        if (c == '"') {
            v.kind = Value::String;
            v.str = string_body();
            return v;
        }
        if (literal("true")) {
            v.kind = Value::Bool;
            v.b = true;
            return v;
        }
        if (literal("false")) {
            v.kind = Value::Bool;
            return v;
        }
        if (literal("null")) return v;
        if (c == '-' || (c >= '0' && c <= '9')) {
            const char* start = s_.c_str() + pos_;
            char* end = nullptr;
            v.kind = Value::Number;
            v.num = std::strtod(start, &end);
            if (end == start) fail("bad number");
            pos_ += (size_t)(end - start);
            return v;
        }
        fail("unexpected character");
    }
    static void put_utf8(std::string& out, uint32_t cp) {
        if (cp < 0x80) {
            out += (char)cp;
        } else if (cp < 0x800) {
            out += (char)(0xC0 | (cp >> 6));
            out += (char)(0x80 | (cp & 0x3F));
        } else if (cp < 0x10000) {
            out += (char)(0xE0 | (cp >> 12));
            out += (char)(0x80 | ((cp >> 6) & 0x3F));
            out += (char)(0x80 | (cp & 0x3F));
        } else {
            out += (char)(0xF0 | (cp >> 18));
            out += (char)(0x80 | ((cp >> 12) & 0x3F));
            out += (char)(0x80 | ((cp >> 6) & 0x3F));
            out += (char)(0x80 | (cp & 0x3F));
        }
    }
    uint32_t hex4() {
        if (pos_ + 4 > s_.size()) fail("short \\u escape");
        uint32_t v = 0;
        for (int i = 0; i < 4; ++i) {
            char h = s_[pos_++];
            v <<= 4;
            if (h >= '0' && h <= '9') v |= (uint32_t)(h - '0');
            else if (h >= 'a' && h <= 'f') v |= (uint32_t)(h - 'a' + 10);
            else if (h >= 'A' && h <= 'F') v |= (uint32_t)(h - 'A' + 10);
            else fail("bad \\u escape");
        }
        return v;
    }
    std::string string_body() {
        expect('"');
        std::string out;
        while (pos_ < s_.size()) {
            char c = s_[pos_++];
            if (c == '"') return out;
            if ((unsigned char)c < 0x20) fail("control character in string");
            if (c != '\\') {
                out += c;
                continue;
            }
            if (pos_ >= s_.size()) break;
            char e = s_[pos_++];
            switch (e) {
                case '"': out += '"'; break;
                case '\\': out += '\\'; break;
                case '/': out += '/'; break;
                case 'b': out += '\b'; break;
                case 'f': out += '\f'; break;
                case 'n': out += '\n'; break;
                case 'r': out += '\r'; break;
                case 't': out += '\t'; break;
                case 'u': {
                    uint32_t cp = hex4();
                    if (cp >= 0xD800 && cp < 0xDC00 && s_.compare(pos_, 2, "\\u") == 0) {
                        pos_ += 2;
                        uint32_t lo = hex4();
                        cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
                    }
                    put_utf8(out, cp);
                    break;
                }
                default: fail("bad escape");
            }
        }
        fail("unterminated string");
    }
};

inline std::vector<Value> parse_all(const std::string& text) { return Parser(text).all(); }

}  // namespace lkjson
