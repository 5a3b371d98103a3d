package worker

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
)

// The framed protocol between the daemon and a Python worker (DESIGN.md
// decision 2). Every frame is a 16-byte little-endian header followed by the
// payload:
//
//	offset size field
//	0      4    payload length
//	4      1    frame type
//	5      1    flags (0)
//	6      2    reserved (0)
//	8      8    call id (0 for frames that belong to no call)
//
// The Python side lives in pkg/pyruntime/snakepit/_worker.py; the two must
// agree on the constants below.

// ProtocolVersion is the version a worker reports in its hello frame.
const ProtocolVersion = 1

const headerSize = 16

// frameType is the kind of a frame.
type frameType uint8

const (
	frameHello        frameType = 1  // worker -> daemon: JSON handshake, after setup
	frameCall         frameType = 2  // daemon -> worker: a call (see appendCall)
	frameResult       frameType = 3  // worker -> daemon: JSON result of a call
	frameError        frameType = 4  // worker -> daemon: JSON error of a call
	frameCancel       frameType = 5  // daemon -> worker: cancel a call
	framePing         frameType = 6  // daemon -> worker: heartbeat, id = sequence
	framePong         frameType = 7  // worker -> daemon: heartbeat answer
	frameFatal        frameType = 8  // worker -> daemon: adapter failed to load; exits
	frameChunk        frameType = 9  // worker -> daemon: one item of a streaming call
	frameCredit       frameType = 10 // daemon -> worker (control): u32 more chunks the stream may send
	frameCloseSession frameType = 11 // daemon -> worker: drop a session's state; payload = session id
)

// Call flags, carried in the header's flags byte of a call frame.
const (
	flagStream           = 1 // the caller reads a stream of chunks
	flagSessionTransient = 2 // run with an empty, throwaway session store
)

func (t frameType) String() string {
	switch t {
	case frameHello:
		return "hello"
	case frameCall:
		return "call"
	case frameResult:
		return "result"
	case frameError:
		return "error"
	case frameCancel:
		return "cancel"
	case framePing:
		return "ping"
	case framePong:
		return "pong"
	case frameFatal:
		return "fatal"
	case frameChunk:
		return "chunk"
	case frameCredit:
		return "credit"
	case frameCloseSession:
		return "close_session"
	}
	return fmt.Sprintf("frame(%d)", uint8(t))
}

// errFrameTooLarge reports a frame over the configured maximum.
var errFrameTooLarge = errors.New("frame exceeds the maximum message size")

func putHeader(b []byte, t frameType, id uint64, n int) {
	binary.LittleEndian.PutUint32(b[0:4], uint32(n))
	b[4] = byte(t)
	b[5] = 0 // flags
	b[6] = 0
	b[7] = 0
	binary.LittleEndian.PutUint64(b[8:16], id)
}

// appendFrame appends a frame with the given payload to dst.
func appendFrame(dst []byte, t frameType, id uint64, payload []byte) []byte {
	var h [headerSize]byte
	putHeader(h[:], t, id, len(payload))
	dst = append(dst, h[:]...)
	return append(dst, payload...)
}

// callHeaderSize is the fixed part of a call payload: timeout in ms (u32),
// stream window (u32), then the lengths (u16 each) of tool, session id,
// request id and correlation id, which follow in that order; the JSON args
// take the rest.
const callHeaderSize = 16

// maxCallField is the longest tool name or id a call can carry.
const maxCallField = 0xFFFF

// appendCall appends a whole call frame to dst.
func appendCall(dst []byte, id uint64, c *Call, flags byte, timeoutMS, window uint32) []byte {
	n := callHeaderSize + len(c.Tool) + len(c.SessionID) + len(c.RequestID) + len(c.CorrelationID) + len(c.Args)
	var h [headerSize + callHeaderSize]byte
	putHeader(h[:], frameCall, id, n)
	h[5] = flags
	p := h[headerSize:]
	binary.LittleEndian.PutUint32(p[0:4], timeoutMS)
	binary.LittleEndian.PutUint32(p[4:8], window)
	binary.LittleEndian.PutUint16(p[8:10], uint16(len(c.Tool)))
	binary.LittleEndian.PutUint16(p[10:12], uint16(len(c.SessionID)))
	binary.LittleEndian.PutUint16(p[12:14], uint16(len(c.RequestID)))
	binary.LittleEndian.PutUint16(p[14:16], uint16(len(c.CorrelationID)))
	dst = append(dst, h[:]...)
	dst = append(dst, c.Tool...)
	dst = append(dst, c.SessionID...)
	dst = append(dst, c.RequestID...)
	dst = append(dst, c.CorrelationID...)
	return append(dst, c.Args...)
}

// frameReader reads frames from a buffered stream.
type frameReader struct {
	r   io.Reader
	max int
	hdr [headerSize]byte
}

// next reads one frame. The payload is a fresh slice owned by the caller.
func (fr *frameReader) next() (frameType, uint64, []byte, error) {
	if _, err := io.ReadFull(fr.r, fr.hdr[:]); err != nil {
		return 0, 0, nil, err
	}
	n := binary.LittleEndian.Uint32(fr.hdr[0:4])
	t := frameType(fr.hdr[4])
	id := binary.LittleEndian.Uint64(fr.hdr[8:16])
	if fr.max > 0 && int64(n) > int64(fr.max) {
		return t, id, nil, fmt.Errorf("%s frame of %d bytes: %w (%d)", t, n, errFrameTooLarge, fr.max)
	}
	if n == 0 {
		return t, id, nil, nil
	}
	payload := make([]byte, n)
	if _, err := io.ReadFull(fr.r, payload); err != nil {
		if errors.Is(err, io.EOF) {
			err = io.ErrUnexpectedEOF
		}
		return t, id, nil, err
	}
	return t, id, payload, nil
}
